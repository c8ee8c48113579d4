"""Faust tables and what is stored in them."""

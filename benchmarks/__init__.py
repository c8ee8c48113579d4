"""Benchmarks (run as modules, not tests)."""

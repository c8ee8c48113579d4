"""escrow-stream: holds a marketplace buyer's money until delivery, as a Faust stream app."""

__version__ = "0.1.0"

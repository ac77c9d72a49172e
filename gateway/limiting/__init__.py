"""Limiting: the pure bucket arithmetic, the refill clock, the stores, the limiter."""

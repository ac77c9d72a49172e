"""ratelimit-gateway: a rate-limited HTTP reverse proxy."""

__version__ = "0.1.0"

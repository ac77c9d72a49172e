"""The rules between keys, checked on built model objects.

Converters (``gateway.config.convert``) judge one value; these judge values
together. Each rule returns ``(key path, message)``: the loader places the
problem at the node of that key path, or of the nearest enclosing key when the
file does not hold it, so it still reads ``PATH:LINE:COL: key.path: message``.
"""

from __future__ import annotations

from gateway.config.model import MIN_REFILL_PERIOD_SECONDS, BucketSpec, GatewayConfig

__all__ = ["Problem", "bucket_problems", "config_problems"]

Problem = tuple[str, str]  # (key path, message)


def bucket_problems(bucket: BucketSpec, key: str, *, read_cleanly: bool) -> list[Problem]:
    """One bucket's rules. The loader checks each bucket as soon as it is built,
    before routes and overrides inherit its keys: a bad ``limits.default`` is
    reported once, not again at every route that inherits from it.

    ``read_cleanly``: every key of this bucket converted. The sizes are compared
    only then: a key that failed stands in with a default the user never wrote.
    """
    period = bucket.refill_period_seconds
    if period < MIN_REFILL_PERIOD_SECONDS:
        return [
            (
                f"{key}.refill_period",
                f"must be at least 10ms (the refill clock's resolution), got {period}s",
            )
        ]
    if read_cleanly and bucket.max_tokens < bucket.refill_tokens:
        return [
            (
                f"{key}.max_tokens",
                f"max_tokens ({bucket.max_tokens}) must be at least "
                f"refill_tokens ({bucket.refill_tokens})",
            )
        ]
    return []


def config_problems(config: GatewayConfig) -> list[Problem]:
    """The rules across sections, on the whole built config."""
    problems: list[Problem] = []
    listen, admin = config.listen_port, config.admin_port
    if listen != 0 and listen == admin and _same_host(config.listen_host, config.admin_host):
        problems.append(
            (
                "admin",
                f"port {admin} is the proxy listener's too; the admin listener needs its own",
            )
        )
    workers = config.workers
    if workers > 1 and config.storage.backend == "memory":
        problems.append(
            (
                "workers",
                f"{workers} workers with storage.backend: memory would give every client "
                f"{workers}x its limit (each process has its own buckets); "
                "set storage.backend: redis to share buckets, or workers: 1",
            )
        )
    return problems


def _same_host(a: str, b: str) -> bool:
    wildcard = ("0.0.0.0", "::")
    return a == b or a in wildcard or b in wildcard

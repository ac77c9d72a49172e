"""Compiles the request path with mypyc when it can; pure Python otherwise.

pyproject.toml holds the project's metadata; this file only adds the
optional extension modules, as aiohttp, yarl and multidict do. See
docs/compiled.md for what is compiled, why, and how to force pure Python.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

# The modules every request runs through, in the order it meets them. The
# shared library is named inside the package (``gateway._hot__mypyc``), so an
# in-place build works without the repository root on sys.path.
COMPILED = [
    "gateway/proxy_app.py",
    "gateway/front.py",
    "gateway/core.py",
    "gateway/relay.py",
    "gateway/upstream.py",
    "gateway/upstream_pool.py",
    "gateway/balancer.py",
    "gateway/access_log.py",
    "gateway/metrics.py",
    "gateway/responses.py",
    "gateway/raw_response.py",
    "gateway/headers.py",
    "gateway/clients.py",
    "gateway/limiting/bucket.py",
    "gateway/limiting/limiter.py",
    "gateway/limiting/memory_store.py",
    "gateway/limiting/policy.py",
    "gateway/limiting/refill_clock.py",
    "gateway/limiting/routes.py",
    "gateway/limiting/store.py",
    "gateway/config/model.py",
    "gateway/errors.py",
]
GROUP = "gateway._hot"


def _pure(reason: str) -> list[object]:
    print(f"ratelimit-gateway: {reason}; installing pure Python", file=sys.stderr)
    return []


def extensions() -> list[object]:
    if os.environ.get("GATEWAY_NO_EXTENSIONS"):
        return []
    if sys.implementation.name != "cpython":
        return _pure(f"{sys.implementation.name} is not CPython")
    try:
        from mypyc.build import mypycify
    except ImportError:
        return _pure("mypyc is not available")
    try:
        return list(mypycify(COMPILED, opt_level="3", debug_level="0", group_name=GROUP))
    except BaseException as exc:  # mypyc exits through SystemExit on a type error
        return _pure(f"mypyc failed: {exc!r}")


def _stamp() -> str:
    """The compiled sources as they are now (gateway/__init__.py compares)."""
    lines = []
    for path in [*COMPILED, "setup.py"]:  # this file: the list of what is compiled
        stat = os.stat(path)
        name = path.removeprefix("gateway/") if path.startswith("gateway/") else f"../{path}"
        lines.append(f"{name} {stat.st_mtime_ns} {stat.st_size}\n")
    return "".join(lines)


class OptionalBuildExt(build_ext):
    """All or nothing: each module's stub needs the group's shared library,
    so a failed compile removes whatever it built and leaves pure Python.
    An in-place build (scripts/setup) records what it compiled, so that a
    source edited afterwards is run as source, not as the older build."""

    def run(self) -> None:
        stamp = os.path.join("gateway", ".compiled-sources")
        if self.inplace and os.path.exists(stamp):
            os.remove(stamp)
        try:
            super().run()
            if self.inplace and self.extensions:
                with open(stamp, "w") as file:
                    file.write(SOURCES)
        except Exception as exc:  # CompileError, LinkError, PlatformError, ...
            print(
                f"ratelimit-gateway: compiling failed: {exc!r}; installing pure Python",
                file=sys.stderr,
            )
            for path in self.get_outputs():
                if os.path.exists(path):
                    os.remove(path)
            self.extensions = []


SOURCES = _stamp()  # before mypyc reads them: an edit during the build is seen
setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})

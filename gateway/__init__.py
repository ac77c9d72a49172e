"""ratelimit-gateway: a rate-limited HTTP reverse proxy.

The modules a request runs through may be compiled with mypyc (setup.py);
their ``.py`` sources stay beside them and mean the same. Python imports a
compiled module in preference to its source, so two cases import the
sources instead, the way aiohttp's and yarl's ``*_NO_EXTENSIONS`` work:

- ``GATEWAY_NO_EXTENSIONS`` set to anything but ``""`` or ``0``: pure Python
  on request (CI runs the suite both ways);
- an in-place build (``scripts/setup``) older than a source it was made
  from: the build would run code that is no longer in the tree, so the
  sources win until the next build, and a warning says so.
"""

from __future__ import annotations

import os
import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import SOURCE_SUFFIXES, FileFinder, ModuleSpec, SourceFileLoader
from importlib.util import find_spec
from pathlib import Path
from types import ModuleType

__version__ = "0.1.0"

# Written by setup.py's in-place build: one line per compiled source,
# "<path relative to this package> <mtime_ns> <size>" as it was compiled.
BUILD_STAMP = ".compiled-sources"


class _SourcesOnly(MetaPathFinder):
    """Finds this package's modules among ``.py`` files alone."""

    def __init__(self) -> None:
        self._finders: dict[str, FileFinder] = {}

    def find_spec(
        self,
        fullname: str,
        path: object = None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if not fullname.startswith(__name__ + ".") or not isinstance(path, list | tuple):
            return None
        for entry in path:
            finder = self._finders.get(entry)
            if finder is None:
                finder = FileFinder(entry, (SourceFileLoader, SOURCE_SUFFIXES))
                self._finders[entry] = finder
            spec = finder.find_spec(fullname, target)
            if spec is not None:
                return spec
        return None


def stale_build(package: Path) -> str | None:
    """The first source changed since the in-place build, if any."""
    try:
        lines = (package / BUILD_STAMP).read_text().splitlines()
    except OSError:
        return None  # no in-place build: an installed wheel, or pure Python
    for line in lines:
        name, mtime_ns, size = line.rsplit(" ", 2)
        try:
            stat = (package / name).stat()
        except OSError:
            return name
        if (stat.st_mtime_ns, stat.st_size) != (int(mtime_ns), int(size)):
            return name
    return None


def in_place_build_is_current() -> bool:
    """An in-place build is here and made from the sources as they are."""
    package = Path(__file__).parent
    return (package / BUILD_STAMP).exists() and stale_build(package) is None


def request_path_build() -> str:
    """How the request path runs here: "compiled (mypyc)" or "pure Python".
    Found without importing it: the CLI asks before the supervisor has set
    up what prometheus_client reads at import."""
    spec = find_spec(__name__ + ".core")
    origin = (spec.origin if spec is not None else None) or ""
    return "pure Python" if origin.endswith(".py") else "compiled (mypyc)"


def _choose_build() -> None:
    if os.environ.get("GATEWAY_NO_EXTENSIONS", "") not in ("", "0"):
        sys.meta_path.insert(0, _SourcesOnly())
        return
    changed = stale_build(Path(__file__).parent)
    if changed is not None:
        print(
            f"gateway: {changed} changed since the compiled build; running pure Python "
            "until scripts/setup builds again",
            file=sys.stderr,
        )
        sys.meta_path.insert(0, _SourcesOnly())


_choose_build()

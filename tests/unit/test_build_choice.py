"""Which build of the request path runs (gateway/__init__.py): compiled
modules when they are here and current, the ``.py`` sources when
``GATEWAY_NO_EXTENSIONS`` asks or when a source changed since an in-place
build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import gateway
from gateway import BUILD_STAMP, stale_build

REPO = Path(__file__).resolve().parents[2]
PURE_LEG = os.environ.get("GATEWAY_NO_EXTENSIONS", "") not in ("", "0")


def _stamp(package: Path, *names: str) -> None:
    lines = []
    for name in names:
        stat = (package / name).stat()
        lines.append(f"{name} {stat.st_mtime_ns} {stat.st_size}\n")
    (package / BUILD_STAMP).write_text("".join(lines))


def test_no_stamp_is_no_in_place_build(tmp_path: Path) -> None:
    """An installed wheel has no stamp: its compiled modules are used."""
    (tmp_path / "core.py").write_text("x = 1\n")
    assert stale_build(tmp_path) is None


def test_a_source_edited_after_the_build_is_named(tmp_path: Path) -> None:
    (tmp_path / "core.py").write_text("x = 1\n")
    (tmp_path / "front.py").write_text("y = 1\n")
    (tmp_path / "limiting").mkdir()
    (tmp_path / "limiting" / "bucket.py").write_text("z = 1\n")
    _stamp(tmp_path, "core.py", "front.py", "limiting/bucket.py")
    assert stale_build(tmp_path) is None

    os.utime(tmp_path / "limiting" / "bucket.py", ns=(0, 1))  # touched: mtime differs
    assert stale_build(tmp_path) == "limiting/bucket.py"


def test_a_source_of_the_same_mtime_but_another_size_is_stale(tmp_path: Path) -> None:
    source = tmp_path / "core.py"
    source.write_text("x = 1\n")
    _stamp(tmp_path, "core.py")
    before = source.stat().st_mtime_ns
    source.write_text("x = 12\n")
    os.utime(source, ns=(before, before))
    assert stale_build(tmp_path) == "core.py"


def test_a_source_removed_since_the_build_is_stale(tmp_path: Path) -> None:
    (tmp_path / "core.py").write_text("x = 1\n")
    _stamp(tmp_path, "core.py")
    (tmp_path / "core.py").unlink()
    assert stale_build(tmp_path) == "core.py"


def _origins(env: dict[str, str]) -> dict[str, str]:
    """Where a fresh interpreter imports the request path's modules from."""
    code = (
        "import gateway, gateway.core, gateway.front, gateway.limiting.bucket as b\n"
        "print(gateway.core.__file__); print(gateway.front.__file__); print(b.__file__)\n"
        "print(gateway.request_path_build())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    core, front, bucket, build = done.stdout.splitlines()
    return {"core": core, "front": front, "bucket": bucket, "build": build}


def test_gateway_no_extensions_imports_the_sources() -> None:
    origins = _origins({**os.environ, "GATEWAY_NO_EXTENSIONS": "1"})
    assert origins == {
        "core": str(REPO / "gateway" / "core.py"),
        "front": str(REPO / "gateway" / "front.py"),
        "bucket": str(REPO / "gateway" / "limiting" / "bucket.py"),
        "build": "pure Python",
    }


@pytest.mark.skipif(PURE_LEG, reason="the compiled leg checks the compiled build")
def test_the_compiled_leg_runs_compiled_modules() -> None:
    """scripts/test's first leg: the in-place build is current and used, so
    the suite really tests the compiled request path."""
    assert gateway.in_place_build_is_current(), "scripts/setup did not build in place"
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_NO_EXTENSIONS"}
    origins = _origins(env)
    assert origins["build"] == "compiled (mypyc)"
    for name in ("core", "front", "bucket"):
        assert origins[name].endswith(".so"), origins
    assert gateway.request_path_build() == "compiled (mypyc)"


@pytest.mark.skipif(not PURE_LEG, reason="the pure leg checks pure Python")
def test_the_pure_leg_runs_the_sources() -> None:
    assert gateway.request_path_build() == "pure Python"
    from gateway import core

    assert core.__file__ is not None
    assert core.__file__.endswith(".py")

"""Workers hand their top-denied sketches to the supervisor through files
(gateway/top_clients_share.py): written atomically when changed, merged and
cached by the reader, resumed by a restarted worker, bounded in size. Real
files in the test's tmp dir; time is an argument, no test sleeps."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import pytest

from gateway import top_clients_share
from gateway.top_clients import SpaceSaving, TopClients
from gateway.top_clients_share import SharedTopDenied, TopDeniedWriter, top_denied_path


def test_each_worker_s_file_is_merged_by_the_supervisor(tmp_path: Path) -> None:
    tops = [TopClients(), TopClients()]
    writers = [
        TopDeniedWriter(t, top_denied_path(str(tmp_path), i)) for i, t in enumerate(tops)
    ]
    shared = SharedTopDenied(str(tmp_path), 2)
    assert shared.read().top(5, 10.0) == []  # no file yet: nobody denied
    tops[0].record("a", 10.0, "/api", 3)
    tops[1].record("a", 11.0, "/api", 2)
    tops[1].record("b", 11.0, "/login", 4)
    for writer in writers:
        writer.write()
    merged = shared.read()
    assert merged.top(5, 20.0) == [("a", 5, 0), ("b", 4, 0)]
    assert merged.top(5, 20.0, route="/login") == [("b", 4, 0)]
    # Unchanged files: the same merge, not another.
    assert shared.read() is merged
    tops[0].record("b", 12.0, "/login", 2)
    writers[0].write()
    assert shared.read().top(1, 20.0) == [("b", 6, 0)]
    assert sorted(os.listdir(tmp_path)) == ["top-denied-0.json", "top-denied-1.json"]


def test_an_unchanged_sketch_is_not_written_again(tmp_path: Path) -> None:
    top = TopClients()
    writer = TopDeniedWriter(top, top_denied_path(str(tmp_path), 0))
    writer.write()  # an empty sketch is written once, so a restart finds a file
    path = Path(writer.path)
    path.unlink()
    writer.write()
    assert not path.exists()
    top.record("a", 1.0)
    writer.write()
    assert path.exists()


def test_a_restarted_worker_resumes_from_its_predecessor_s_file(tmp_path: Path) -> None:
    path = top_denied_path(str(tmp_path), 1)
    before = TopClients()
    before.record("a", 100.0, "/api", 7)
    TopDeniedWriter(before, path).write()
    after = TopClients()
    writer = TopDeniedWriter(after, path)
    writer.resume()
    after.record("a", 130.0, "/api", 1)
    assert after.top(1, 130.0, route="/api") == [("a", 8, 0)]
    writer.write()
    assert SharedTopDenied(str(tmp_path), 2).read().top(1, 130.0) == [("a", 8, 0)]


@pytest.mark.parametrize(
    "content",
    [b"", b"[]", b"{not json", b'{"overall": {}, "routes": {}}', b"\xff\xfe"],
    ids=["empty", "not-an-object", "broken", "not-a-sketch", "not-utf8"],
)
def test_a_bad_file_is_left_out_and_logged(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    good = TopClients()
    good.record("a", 5.0)
    TopDeniedWriter(good, top_denied_path(str(tmp_path), 0)).write()
    Path(top_denied_path(str(tmp_path), 1)).write_bytes(content)
    with caplog.at_level(logging.WARNING, "gateway.workers"):
        merged = SharedTopDenied(str(tmp_path), 2).read()
    assert merged.top(5, 5.0) == [("a", 1, 0)]
    assert "top-denied-1.json left out" in caplog.text
    # The worker of that index starts afresh rather than failing.
    fresh = TopClients()
    TopDeniedWriter(fresh, top_denied_path(str(tmp_path), 1)).resume()
    assert fresh.top(5, 5.0) == []


def test_a_file_over_the_bound_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    top = TopClients()
    for i in range(50):
        top.record(f"client-{i}", 5.0, "/api")
    writer = TopDeniedWriter(top, top_denied_path(str(tmp_path), 0))
    writer.write()
    monkeypatch.setattr(top_clients_share, "MAX_FILE_BYTES", 1000)
    with caplog.at_level(logging.WARNING, "gateway.workers"):
        merged = SharedTopDenied(str(tmp_path), 1).read()
    assert merged.top(5, 5.0) == []
    assert "larger than 1000 bytes" in caplog.text


def test_a_failed_write_is_logged_once_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    top = TopClients()
    missing = tmp_path / "gone"
    writer = TopDeniedWriter(top, top_denied_path(str(missing), 0))
    top.record("a", 1.0)
    with caplog.at_level(logging.WARNING, "gateway.workers"):
        writer.write()
        writer.write()
    assert caplog.text.count("cannot write") == 1
    missing.mkdir()
    writer.write()
    assert Path(writer.path).exists()


def _answers(top: TopClients, now: float) -> list[object]:
    return [top.top(64, now), *(top.top(64, now, route=r) for r in top.routes)]


def test_a_read_after_a_change_parses_and_merges_only_what_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files rewritten every second change in their current minute only: the
    supervisor parses that again, not the closed minutes, and its answer is
    the one a merge from scratch gives."""
    rng = random.Random(7)
    tops = [TopClients(k=8), TopClients(k=8)]
    writers = [
        TopDeniedWriter(t, top_denied_path(str(tmp_path), i)) for i, t in enumerate(tops)
    ]
    shared = SharedTopDenied(str(tmp_path), 2)
    parsed = 0
    real_from_dict = SpaceSaving.from_dict.__func__  # type: ignore[attr-defined]

    def counting_from_dict(cls: type[SpaceSaving], data: Any) -> SpaceSaving:
        nonlocal parsed
        parsed += 1
        result: SpaceSaving = real_from_dict(cls, data)
        return result

    monkeypatch.setattr(SpaceSaving, "from_dict", classmethod(counting_from_dict))
    for second in range(0, 600, 7):  # ten minutes, a write every 7 s
        for top in tops:
            for _ in range(rng.randint(0, 30)):
                top.record(f"c{rng.randint(0, 20)}", float(second), f"/r{rng.randint(0, 3)}")
        for writer in writers:
            writer.write()
        parsed = 0
        merged = shared.read()
        # At most the current sub-window of overall and 4 routes, per worker.
        assert parsed <= 2 * 5, second
        fresh = TopClients.merged(
            [TopClients.from_dict(json.loads(Path(p).read_text())) for p in shared.paths]
        )
        assert _answers(merged, float(second)) == _answers(fresh, float(second)), second

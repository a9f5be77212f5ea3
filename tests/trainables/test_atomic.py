"""Files written whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxrtune.trainables.atomic import atomic_path, write_atomically


def test_a_write_replaces_the_file_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    target = tmp_path / "evaluation.json"
    target.write_text("old")
    write_atomically(target, "new")
    write_atomically(tmp_path / "model.pt", b"\x00\x01", durable=True)
    assert target.read_text() == "new"
    assert (tmp_path / "model.pt").read_bytes() == b"\x00\x01"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["evaluation.json", "model.pt"]


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_partial_one(tmp_path: Path) -> None:
    target = tmp_path / "cache.npz"
    target.write_bytes(b"whole")
    with pytest.raises(OSError, match="disk full"), atomic_path(target) as partial:
        partial.write_bytes(b"ha")
        raise OSError("disk full")
    assert target.read_bytes() == b"whole"
    assert [path.name for path in tmp_path.iterdir()] == ["cache.npz"]


def test_two_writers_of_one_file_get_their_own_partial_files(tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second and first.name.startswith(".report.html.")
        first.write_text("first")
        second.write_text("second")
    # The outer block ends last: its file is the one that stays.
    assert target.read_text() == "first"

"""Item 13: output places are created and checked before a command does any work."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cxrtune.analysis.outputs import OutputError, writable_file, writable_folder, writable_parent

# A place no process can create files in, root included.
UNWRITABLE = Path("/proc/cxrtune-output-check")


def test_missing_parent_folders_are_created_and_no_check_file_is_left(tmp_path: Path) -> None:
    assert writable_file(tmp_path / "a" / "b" / "preds.csv", option="--csv").parent.is_dir()
    assert writable_folder(tmp_path / "c" / "cams", option="--gradcam").is_dir()
    assert writable_parent(tmp_path / "d" / "model", option="--out") == tmp_path / "d" / "model"
    assert not (tmp_path / "d" / "model").exists() and (tmp_path / "d").is_dir()
    leftovers = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert leftovers == []


def test_an_existing_file_may_be_replaced(tmp_path: Path) -> None:
    (tmp_path / "preds.csv").write_text("old")
    writable_file(tmp_path / "preds.csv", option="--csv")
    assert (tmp_path / "preds.csv").read_text() == "old"


@pytest.mark.parametrize("check", [writable_file, writable_folder, writable_parent])
def test_a_file_where_a_folder_is_expected_is_an_error_naming_both(
    tmp_path: Path, check: object
) -> None:
    blocker = tmp_path / "out"
    blocker.write_text("a file")
    target = blocker / "sub" / "preds.csv"
    with pytest.raises(OutputError, match=f"--x {target}: .*{blocker} is a file, not a folder"):
        check(target, option="--x")  # type: ignore[operator]
    assert blocker.read_text() == "a file"


def test_a_folder_given_as_an_output_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="is a folder; give the name of a file"):
        writable_file(tmp_path, option="--csv")


def test_a_place_that_refuses_writes_is_an_error_naming_it() -> None:
    with pytest.raises(OutputError, match=f"--csv {UNWRITABLE}/preds.csv: cannot write there"):
        writable_file(UNWRITABLE / "preds.csv", option="--csv")
    with pytest.raises(OutputError, match="cannot write there"):
        writable_folder("/proc/self", option="--gradcam")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits; /proc stands in")
def test_a_read_only_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="cannot write there"):
            writable_folder(tmp_path / "cams", option="--gradcam")
    finally:
        tmp_path.chmod(0o700)

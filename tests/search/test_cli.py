from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cxrtune.search.cli import EXIT_BAD_INPUT, EXIT_OK, build_parser, main

COMMANDS = [["sweep"], ["resume"], ["leaderboard"], ["data"], ["data", "synth"]]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cxrtune.search.cli", *args], capture_output=True, text=True
    )


@pytest.mark.parametrize("command", [[], *COMMANDS], ids=lambda c: " ".join(c) or "cxrtune")
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: cxrtune" in capsys.readouterr().out


def test_help_does_not_import_ray_or_torch() -> None:
    code = (
        "import sys\nfrom cxrtune.search.cli import build_parser\n"
        "build_parser().format_help()\nprint('ray' in sys.modules, 'torch' in sys.modules)"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert output.stdout.split() == ["False", "False"]


def test_an_unknown_sweep_key_exits_2_naming_it_without_a_traceback(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("num_sampels: 4\n")
    result = run_cli("sweep", str(sweep))
    assert result.returncode == EXIT_BAD_INPUT
    assert "num_sampels" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_dataset_without_a_covid_class_exits_2_before_any_trial(
    make_image_folder: Callable[..., Path], tmp_path: Path
) -> None:
    root = make_image_folder({"Normal": 10, "Pneumonia": 10})
    result = run_cli("sweep", "--data", str(root), "--set", f"storage_path={tmp_path / 'out'}")
    assert result.returncode == EXIT_BAD_INPUT
    assert "no class matches the positive class 'COVID'" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Ray" not in result.stdout + result.stderr


def test_a_folder_that_is_not_an_experiment_exits_2(tmp_path: Path) -> None:
    result = run_cli("leaderboard", str(tmp_path))
    assert result.returncode == EXIT_BAD_INPUT
    assert "not a cxrtune experiment dir" in result.stderr


def test_data_synth_writes_a_labelled_synthetic_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "synthetic"
    assert main(["data", "synth", str(target), "--n", "40", "--size", "32"]) == EXIT_OK
    assert "SYNTHETIC" in capsys.readouterr().out
    assert sum(1 for _ in target.rglob("*.png")) == 40
    assert (target / "SYNTHETIC.txt").is_file()


def test_data_synth_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    result = run_cli("data", "synth", str(tmp_path), "--n", "40")
    assert result.returncode == EXIT_BAD_INPUT
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_data_inspect_reports_counts_sizes_modes_and_duplicates(
    make_image_folder: Callable[..., Path],
) -> None:
    root = make_image_folder({"COVID": 4, "Normal": 6})
    (root / "Normal" / "again.png").write_bytes((root / "Normal" / "000.png").read_bytes())
    result = run_cli("data", "inspect", str(root))
    assert result.returncode == EXIT_OK, result.stderr
    assert "COVID: 4" in result.stdout and "Normal: 7" in result.stdout
    assert "24 x 24 (11)" in result.stdout and "L (11)" in result.stdout
    assert "Exact duplicates: 1 contents in 2 images" in result.stdout


def test_data_inspect_reads_a_latin1_manifest_only_when_told_its_encoding(tmp_path: Path) -> None:
    """Issue item 2: exit 2 naming the line, or a report with --manifest-encoding."""
    from tests.trainables.test_ingest import four_scans

    four_scans(tmp_path)
    manifest = tmp_path / "m.csv"
    rows = [f"scans/{i}.png,{'COVID' if i < 2 else 'Normal'},Hôpital" for i in range(4)]
    manifest.write_bytes(("path,label,source\n" + "\n".join(rows) + "\n").encode("latin-1"))
    refused = run_cli("data", "inspect", str(manifest))
    assert refused.returncode == EXIT_BAD_INPUT
    assert "line 2 is not UTF-8" in refused.stderr and "Traceback" not in refused.stderr
    read = run_cli("data", "inspect", str(manifest), "--manifest-encoding", "latin-1")
    assert read.returncode == EXIT_OK, read.stderr
    assert "COVID: 2" in read.stdout


def test_a_test_source_matching_no_image_stops_the_sweep_with_exit_2_and_the_counts(
    tmp_path: Path,
) -> None:
    """Issue item 3: the guard runs before any trial (and before Ray starts)."""
    from tests.trainables.test_ingest import four_scans

    four_scans(tmp_path)
    manifest = tmp_path / "m.csv"
    rows = [f"scans/{i}.png,{'COVID' if i < 2 else 'Normal'},site {i % 2}" for i in range(4)]
    manifest.write_text("path,label,source\n" + "\n".join(rows) + "\n")
    result = run_cli(
        "sweep", "--data", str(manifest), "--test-source", "elsewhere",
        "--set", f"storage_path={tmp_path / 'results'}",
    )  # fmt: skip
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert "test_source 'elsewhere' matches no image; sources: 'site 0' (2), 'site 1' (2)" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "results").glob("*/*_*"))  # no trial folder


def test_bad_files_stop_inspect_and_sweep_with_exit_2_listing_all(tmp_path: Path) -> None:
    from tests.trainables.test_ingest import make_folder_with_bad_files

    root = make_folder_with_bad_files(tmp_path / "data")
    inspect = run_cli("data", "inspect", str(root))
    sweep = run_cli("sweep", "--data", str(root), "--set", f"storage_path={tmp_path}")
    for result in (inspect, sweep):
        assert result.returncode == EXIT_BAD_INPUT, result.stderr
        for name in ("corrupt.png", "truncated.jpg", "notes.png"):
            assert name in result.stderr
        assert "Traceback" not in result.stderr
    skipped = run_cli("data", "inspect", str(root), "--skip-bad-images")
    assert skipped.returncode == EXIT_OK
    assert "Unreadable files (skipped): 3" in skipped.stdout


def test_resuming_a_sweep_stored_on_s3_exits_2_saying_it_is_not_supported() -> None:
    result = run_cli("resume", "s3://KEY:SECRET@bucket/results/exp-1")
    assert result.returncode == EXIT_BAD_INPUT
    assert "not supported yet" in result.stderr and "s3://***@bucket/results/exp-1" in result.stderr
    assert "SECRET" not in result.stderr and "Traceback" not in result.stderr

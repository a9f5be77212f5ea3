from __future__ import annotations

import json
from pathlib import Path

from cxrtune.analysis.experiment import read_trial

FAILURE = (
    "Failure # 1 (occurred at 2026-01-05_10-00-30)\n"
    "The actor is unavailable: RpcError: Socket closed\n"
)


def trial_folder(tmp_path: Path, dates: list[str], error: str) -> Path:
    folder = tmp_path / "a1b2c3d4_baseline_cnn"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({"family": "baseline_cnn"}))
    rows = [
        {"trial_id": "a1b2c3d4", "epoch": epoch, "date": date}
        for epoch, date in enumerate(dates, 1)
    ]
    (folder / "result.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "error.txt").write_text(error)
    return folder


def test_a_trial_that_reported_after_its_retried_failure_is_not_errored(tmp_path: Path) -> None:
    folder = trial_folder(tmp_path, ["2026-01-05_10-00-10", "2026-01-05_10-00-45"], FAILURE)
    assert read_trial(folder).error is None


def test_a_trial_that_failed_after_its_last_report_keeps_its_error(tmp_path: Path) -> None:
    second = FAILURE + "Failure # 2 (occurred at 2026-01-05_10-01-00)\nNonFiniteLossError: nan\n"
    folder = trial_folder(tmp_path, ["2026-01-05_10-00-10", "2026-01-05_10-00-45"], second)
    assert "NonFiniteLossError" in str(read_trial(folder).error)


def test_an_error_without_tunes_failure_header_stands(tmp_path: Path) -> None:
    folder = trial_folder(tmp_path, ["2026-01-05_10-00-10"], "NonFiniteLossError: nan\n")
    assert read_trial(folder).error == "NonFiniteLossError: nan"

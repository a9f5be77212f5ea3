"""The leaderboard in a terminal: fits 120 columns, shows what decides, says what's next."""

from __future__ import annotations

import io
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
from rich.console import Console

from cxrtune.analysis.leaderboard import Leaderboard
from cxrtune.analysis.terminal import compact_table, next_commands, print_leaderboard
from tests.analysis.test_leaderboard import make_experiment

LONG_HEADER = (
    "Experiment: /a/very/long/path/to/results/" + "nested/" * 12 + "quickstart\n"
    "Test intervals: 95% stratified bootstrap, 1000 resamples. Operating point: COVID threshold"
    " chosen on val for specificity 0.95, applied on test."
)


def ranked_rows(count: int) -> pd.DataFrame:
    rows = []
    for index in range(count):
        rows.append(
            {
                "rank": index + 1,
                "trial_id": f"trial{index:03d}",
                "family": "regularized_cnn",
                "imbalance": "class_weight",
                "pareto_front": 1 if index < 2 else 2,
                "val_covid_recall_at_spec": 0.9,
                "val_macro_auc": 0.95 - index / 100,
                "test_covid_recall_at_threshold": 0.944,
                "test_covid_recall_at_threshold_low": 0.833,
                "test_covid_recall_at_threshold_high": 1.0,
                "test_macro_auc": 0.9456,
                "test_macro_auc_low": 0.93,
                "test_macro_auc_high": 0.96,
                # Columns the compact table leaves to --wide and the CSV.
                "lr": 7.3e-4,
                "weight_decay": 6e-5,
                "augment_strength": 0.343,
            }
        )
    return pd.DataFrame(rows)


def printed(leaderboard: Leaderboard, width: int = 200) -> str:
    buffer = io.StringIO()
    print_leaderboard(leaderboard, console=Console(file=buffer, width=width))
    return buffer.getvalue()


def test_the_terminal_leaderboard_fits_120_columns_even_in_a_wider_terminal() -> None:
    failed = pd.DataFrame(
        [{"trial_id": "bad1", "family": "vgg16", "error": "Traceback\n" + "x" * 300}]
    )
    text = printed(Leaderboard(ranked=ranked_rows(12), failed=failed, header=LONG_HEADER))
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)
    assert sum("trial0" in line for line in lines) == 12
    assert "1 trial(s) failed" in text and "\n  bad1 vgg16: " in text


def test_compact_rows_show_the_objectives_and_test_intervals_only() -> None:
    table = compact_table(ranked_rows(1))
    assert list(table.columns) == [
        "rank",
        "trial",
        "family",
        "imbalance",
        "val recall@spec",
        "val AUC",
        "test recall@op (95% CI)",
        "test AUC (95% CI)",
    ]
    row = table.iloc[0]
    assert row["test recall@op (95% CI)"] == "0.94 (0.83\N{EN DASH}1.00)"
    assert row["test AUC (95% CI)"] == "0.95 (0.93\N{EN DASH}0.96)"
    assert row["val AUC"] == "0.95"


def test_a_missing_interval_shows_the_estimate_alone() -> None:
    rows = ranked_rows(1).drop(columns=["test_macro_auc_low", "test_macro_auc_high"])
    assert compact_table(rows).iloc[0]["test AUC (95% CI)"] == "0.95"


def test_next_commands_quote_paths_with_spaces_and_hashes() -> None:
    commands = next_commands("/scans/ward #2/results/quick", "quick")
    assert commands[0] == "cxrtune report '/scans/ward #2/results/quick'"
    assert "--rank 1 --out models/quick-rank1" in commands[1]
    assert commands[2].startswith("cxrtune predict models/quick-rank1 ")


def test_the_next_commands_call_cxrtune_as_the_shell_can(tmp_path: Path) -> None:
    """After ``make demo`` (``.venv/bin/cxrtune``, no venv active) the path; else the name."""
    from cxrtune.analysis.terminal import cxrtune_program

    venv = tmp_path / "my scans" / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "cxrtune").touch()
    called = str(venv / "cxrtune")
    assert cxrtune_program(called, None) == shlex.quote(called)
    assert cxrtune_program(".venv/bin/cxrtune", "/usr/bin/cxrtune") == ".venv/bin/cxrtune"
    assert cxrtune_program(called, called) == "cxrtune"  # PATH finds this one
    assert cxrtune_program("/src/search/cli.py", None) == "cxrtune"  # python -m ...
    commands = next_commands("results/quick", "quick", ".venv/bin/cxrtune")
    assert all(command.startswith(".venv/bin/cxrtune ") for command in commands)


def test_the_leaderboard_command_prints_the_compact_table_then_the_next_commands(
    tmp_path: Path,
) -> None:
    experiment = make_experiment(tmp_path)
    command = [sys.executable, "-m", "cxrtune.search.cli", "leaderboard", str(experiment)]
    compact = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert compact.returncode == 0, compact.stderr
    assert max(len(line) for line in compact.stdout.splitlines()) <= 120
    assert "test AUC (95% CI)" in compact.stdout and "weight_decay" not in compact.stdout
    assert f"cxrtune report {experiment}" in compact.stdout
    wide = subprocess.run([*command, "--wide"], capture_output=True, text=True, timeout=300)
    assert wide.returncode == 0, wide.stderr
    assert "weight_decay" in wide.stdout

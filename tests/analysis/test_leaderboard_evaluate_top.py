"""Held-out test evaluation of the top ``evaluate_top`` trials by val rank only."""

from __future__ import annotations

import io
import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest

from cxrtune.analysis.evaluation import evaluate_in_process
from cxrtune.analysis.experiment import Evaluations, Experiment, read_experiment
from cxrtune.analysis.export import export_model
from cxrtune.analysis.leaderboard import (
    TEST_COLUMNS,
    build_leaderboard,
    format_leaderboard,
    resolve_evaluate_top,
)
from cxrtune.analysis.report import write_report
from cxrtune.analysis.terminal import compact_table
from cxrtune.search.cli import main
from tests.analysis.test_leaderboard import make_experiment

# By val rank: t5 alone on the first Pareto front, then t1 and t2, then t3, then t6.
RANK_ORDER = ["t5", "t1", "t2", "t3", "t6"]


def copy_trial(
    experiment: Path, source: str, trial_id: str, epochs: list[tuple[float, float]]
) -> None:
    """A new trial with ``source``'s checkpoints and the given (val recall, val AUC) per epoch."""
    source_dir = next(experiment.glob(f"{source}_*"))
    family = source_dir.name.split("_", 1)[1]
    target = experiment / f"{trial_id}_{family}"
    shutil.copytree(source_dir, target)
    (target / "evaluation.json").unlink(missing_ok=True)
    rows = [json.loads(line) for line in (target / "result.json").read_text().splitlines()]
    rows = rows[: len(epochs)]
    for row, (recall, auc) in zip(rows, epochs, strict=True):
        row.update(
            trial_id=trial_id,
            val_covid_recall=recall,
            val_covid_recall_at_spec=recall * 0.8,
            val_macro_auc=auc,
        )
    (target / "result.json").write_text("".join(json.dumps(row) + "\n" for row in rows))


def make_five_trials(root: Path) -> Path:
    """``make_experiment``'s three finished trials and its errored one, and two more."""
    experiment = make_experiment(root)
    copy_trial(experiment, "t1", "t5", [(0.9, 0.95), (0.8, 0.90)])
    copy_trial(experiment, "t2", "t6", [(0.1, 0.50), (0.15, 0.55)])
    return experiment


@pytest.fixture(scope="module")
def five_trials(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Evaluated in full once, so each test copies an experiment whose caches hold all five."""
    experiment = make_five_trials(tmp_path_factory.mktemp("five"))
    build_leaderboard(read_experiment(experiment))
    return experiment


def fresh_copy(five_trials: Path, tmp_path: Path, *, keep_evaluations: bool = False) -> Path:
    experiment = tmp_path / "exp"
    shutil.copytree(five_trials, experiment)
    if not keep_evaluations:
        for cache in experiment.glob("*/evaluation.json"):
            cache.unlink()
    return experiment


def counting(calls: list[list[str]]) -> Any:
    """The in-process evaluator, recording which trials each call was given."""

    def evaluate(experiment: Experiment, checkpoints: Mapping[str, Path]) -> Evaluations:
        calls.append(list(checkpoints))
        return evaluate_in_process(experiment, checkpoints)

    return evaluate


def test_only_the_top_trials_by_val_rank_are_evaluated_and_the_rank_is_unchanged(
    five_trials: Path, tmp_path: Path
) -> None:
    full = build_leaderboard(read_experiment(five_trials)).ranked
    experiment = fresh_copy(five_trials, tmp_path)
    leaderboard = build_leaderboard(read_experiment(experiment), evaluate_top=2)
    ranked = leaderboard.ranked
    assert full["trial_id"].tolist() == RANK_ORDER
    assert ranked["trial_id"].tolist() == RANK_ORDER
    assert ranked["test_evaluated"].tolist() == [True, True, False, False, False]
    untested = [column for column in TEST_COLUMNS if column != "threshold"]
    assert ranked.loc[:1, untested].notna().all(axis=None)
    assert ranked.loc[2:, list(TEST_COLUMNS)].isna().all(axis=None)
    pd.testing.assert_frame_equal(
        ranked.drop(columns=[*TEST_COLUMNS, "test_evaluated"]),
        full.drop(columns=[*TEST_COLUMNS, "test_evaluated"]),
    )
    pd.testing.assert_frame_equal(ranked.head(2), full.head(2))
    assert set(leaderboard.predictions) == {"t5", "t1"}
    assert sorted(path.parent.name for path in experiment.glob("*/evaluation.json")) == [
        "t1_baseline_cnn",
        "t5_baseline_cnn",
    ]
    assert set(leaderboard.checkpoints) == set(RANK_ORDER)  # every ranked trial can be exported
    assert "Test evaluated for 2 of 5 ranked trials" in leaderboard.header


def test_the_sweep_files_evaluate_top_applies_and_the_caller_overrides_it(
    five_trials: Path, tmp_path: Path
) -> None:
    experiment = fresh_copy(five_trials, tmp_path, keep_evaluations=True)
    with (experiment / "sweep.yaml").open("a") as sweep:
        sweep.write("evaluate_top: 1\n")
    ranked = build_leaderboard(read_experiment(experiment)).ranked
    assert ranked["test_evaluated"].sum() == 1
    ranked = build_leaderboard(read_experiment(experiment), evaluate_top=3).ranked
    assert ranked["test_evaluated"].tolist() == [True, True, True, False, False]


def test_by_default_every_trial_up_to_a_hundred_is_evaluated_else_the_top_hundred() -> None:
    plain = SimpleNamespace(sweep={})
    assert resolve_evaluate_top(plain, None, 5) == 5  # type: ignore[arg-type]
    assert resolve_evaluate_top(plain, None, 100) == 100  # type: ignore[arg-type]
    assert resolve_evaluate_top(plain, None, 10_000) == 100  # type: ignore[arg-type]
    assert resolve_evaluate_top(plain, 250, 10_000) == 250  # type: ignore[arg-type]
    set_in_sweep = SimpleNamespace(sweep={"evaluate_top": 7})
    assert resolve_evaluate_top(set_in_sweep, None, 10_000) == 7  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "10"])
def test_an_evaluate_top_that_is_not_a_positive_integer_is_an_error_naming_it(value: Any) -> None:
    with pytest.raises(ValueError, match="evaluate_top must be a positive integer"):
        resolve_evaluate_top(SimpleNamespace(sweep={}), value, 5)  # type: ignore[arg-type]


def test_raising_evaluate_top_evaluates_only_the_trials_added(
    five_trials: Path, tmp_path: Path
) -> None:
    experiment = fresh_copy(five_trials, tmp_path)
    calls: list[list[str]] = []
    build_leaderboard(read_experiment(experiment), evaluate_top=2, evaluate=counting(calls))
    build_leaderboard(read_experiment(experiment), evaluate_top=4, evaluate=counting(calls))
    assert calls == [["t5", "t1"], ["t2", "t3"]]


def test_an_unreadable_top_checkpoint_leaves_the_ranking_and_the_next_trial_is_evaluated(
    five_trials: Path, tmp_path: Path
) -> None:
    experiment = fresh_copy(five_trials, tmp_path)
    (experiment / "t5_baseline_cnn" / "checkpoint_000000" / "checkpoint.pt").unlink()
    calls: list[list[str]] = []
    leaderboard = build_leaderboard(
        read_experiment(experiment), evaluate_top=2, evaluate=counting(calls)
    )
    ranked = leaderboard.ranked
    assert ranked["trial_id"].tolist() == ["t1", "t2", "t3", "t6"]
    assert ranked["test_evaluated"].tolist() == [True, True, False, False]
    assert calls == [["t5", "t1"], ["t2"]]
    error = leaderboard.failed.set_index("trial_id")["error"]["t5"]
    assert "checkpoint.pt is missing" in error
    assert "t5" not in leaderboard.checkpoints


def test_tables_mark_the_trials_not_evaluated_and_the_csv_keeps_a_boolean(
    five_trials: Path, tmp_path: Path
) -> None:
    experiment = fresh_copy(five_trials, tmp_path, keep_evaluations=True)
    leaderboard = build_leaderboard(read_experiment(experiment), evaluate_top=2)
    for style in ("table", "md"):
        text = format_leaderboard(leaderboard, style=style)
        assert text.count("not evaluated") == 3 + 1  # three rows and the header
        row = next(line for line in text.splitlines() if " t6 " in line)
        assert "nan" not in row.lower() and "not evaluated" in row
    csv = pd.read_csv(io.StringIO(format_leaderboard(leaderboard, style="csv")))
    assert csv["test_evaluated"].tolist() == [True, True, False, False, False]
    assert math.isnan(csv.loc[4, "test_macro_auc"])
    compact = compact_table(leaderboard.ranked).set_index("trial")
    assert compact.loc["t3", "test AUC (95% CI)"] == "not evaluated"
    assert compact.loc["t1", "test AUC (95% CI)"] != "not evaluated"


def test_report_export_and_commands_work_with_trials_not_evaluated(
    five_trials: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    experiment = fresh_copy(five_trials, tmp_path)
    html = write_report(experiment, top=5, evaluate_top=2).read_text()
    assert "Not evaluated on test: below the top evaluate_top trials by val rank." in html
    assert "Test was evaluated for the top 2 only (evaluate_top)." in html
    assert len(list(experiment.glob("*/evaluation.json"))) == 2

    # An exported model carries its threshold and test metrics: a trial below the top is
    # evaluated for it.
    with (experiment / "sweep.yaml").open("a") as sweep:
        sweep.write("evaluate_top: 2\n")
    model = json.loads(
        (export_model(experiment, tmp_path / "rank4", rank=4) / "model.json").read_text()
    )
    assert model["members"][0]["trial_id"] == "t3"
    assert model["threshold"] is not None and model["metrics"]["test_macro_auc"] is not None
    ensemble = export_model(experiment, tmp_path / "ensemble", ensemble=3)
    assert len(json.loads((ensemble / "model.json").read_text())["members"]) == 3

    assert main(["leaderboard", str(experiment), "--evaluate-top", "1", "--format", "md"]) == 0
    assert "not evaluated" in capsys.readouterr().out
    assert main(["report", str(experiment), "--evaluate-top", "1", "--top", "2"]) == 0
    with pytest.raises(SystemExit) as refused:
        main(["leaderboard", str(experiment), "--evaluate-top", "0"])
    assert refused.value.code == 2
    assert "--evaluate-top: must be a positive integer, got '0'" in capsys.readouterr().err


def test_the_report_command_names_the_report_as_the_user_named_the_dir(
    five_trials: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    experiment = tmp_path / "sweep #1"
    shutil.copytree(five_trials, experiment)
    monkeypatch.chdir(tmp_path)
    assert main(["report", "sweep #1", "--evaluate-top", "1", "--top", "1"]) == 0
    assert f"Report written to {Path('sweep #1', 'report', 'report.html')}\n" in (
        capsys.readouterr().out
    )
    assert (experiment / "report" / "report.html").is_file()


def test_the_sweep_file_refuses_an_evaluate_top_below_one() -> None:
    from cxrtune.search.config import SweepConfigError, load_sweep_config

    assert load_sweep_config(None).evaluate_top is None
    assert load_sweep_config(None, ["evaluate_top=20"]).evaluate_top == 20
    with pytest.raises(SweepConfigError, match="evaluate_top: must be a positive integer"):
        load_sweep_config(None, ["evaluate_top=0"])
    with pytest.raises(SweepConfigError, match="evaluate_top: expected int"):
        load_sweep_config(None, ["evaluate_top=many"])

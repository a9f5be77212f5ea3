"""The sweep's progress lines: elapsed time and an estimate of the time left."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cxrtune.search import progress as progress_module
from cxrtune.search.progress import SweepProgress, expected_epochs_left, format_duration


def test_without_early_stopping_a_trial_runs_every_epoch() -> None:
    assert expected_epochs_left(0, 4, grace_period=4, reduction_factor=2) == 4
    assert expected_epochs_left(3, 4, grace_period=4, reduction_factor=2) == 1
    assert expected_epochs_left(4, 4, grace_period=4, reduction_factor=2) == 0


def test_asha_cuts_halve_the_expected_epochs_after_each_rung() -> None:
    # Rungs at 1 and 2 with max 4: epoch 1 for all, epoch 2 for half, epochs 3-4 for a quarter.
    assert expected_epochs_left(0, 4, grace_period=1, reduction_factor=2) == 1 + 0.5 + 0.25 * 2
    # Standing at rung 2, the trial still faces that rung's cut.
    assert expected_epochs_left(2, 4, grace_period=1, reduction_factor=2) == 0.5 * 2
    # Past every rung, it runs to the end.
    assert expected_epochs_left(3, 4, grace_period=1, reduction_factor=2) == 1
    # reduction_factor 3, grace 1, max 9: rungs at 1 and 3.
    assert expected_epochs_left(0, 9, 1, 3) == pytest.approx(1 + 2 / 3 + 6 / 9)


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (42.4, "42s"), (185, "3m05s"), (3725, "1h02m")]
)
def test_durations_are_short(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def fake_trial(trial_id: str, epoch: int | None = None, status: str = "RUNNING") -> SimpleNamespace:
    return SimpleNamespace(
        trial_id=trial_id,
        config={"family": "baseline_cnn"},
        last_result={"epoch": epoch} if epoch else {},
        status=status,
        path="/results/x",
    )


def test_time_left_comes_from_the_epoch_rate_and_the_remaining_budget(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = iter([0.0, 0.0, 0.0, 10.0, 20.0, 30.0])
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    progress = SweepProgress(num_samples=3, max_epochs=2, grace_period=2)
    progress.setup()
    progress.on_step_begin(0, [])
    first, second = fake_trial("a"), fake_trial("b")
    progress.on_trial_start(0, [], first)
    assert "estimating left" in capsys.readouterr().out

    # 1 epoch in 10 s; 5 of the 6 trial-epochs are still to run: 50 s left.
    progress.on_trial_result(0, [], first, {"epoch": 1})
    assert "~50s left" in capsys.readouterr().out
    # 2 epochs in 20 s; 4 to go.
    progress.on_trial_result(0, [], second, {"epoch": 1})
    assert "~40s left" in capsys.readouterr().out
    # a stopped before its last epoch: its unrun epoch leaves the budget. 2 in 30 s, 3 to go.
    progress.on_trial_complete(0, [], first)
    out = capsys.readouterr().out
    assert "[   30s" in out and "~45s left" in out and "1/3]" in out


def test_a_resumed_sweep_counts_the_epochs_its_trials_had_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    progress = SweepProgress(num_samples=3, max_epochs=4, grace_period=4)
    earlier = [fake_trial("a", 4, "TERMINATED"), fake_trial("b", 3, "PAUSED")]
    progress.on_step_begin(0, earlier)
    assert progress.finished == 1
    # b has 1 epoch left, the trial not yet started 4.
    assert progress.epochs_left() == 1 + 4


def test_the_last_line_says_done() -> None:
    progress = SweepProgress(num_samples=1, max_epochs=1)
    progress.on_step_begin(0, [])
    trial = fake_trial("a")
    progress.on_trial_start(0, [], trial)
    progress.on_trial_result(0, [], trial, {"epoch": 1})
    progress.on_trial_complete(0, [], trial)
    assert progress.time_left(5.0) == "done"

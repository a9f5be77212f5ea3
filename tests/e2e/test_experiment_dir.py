"""One real tiny sweep keeping one checkpoint per trial, its val metric tied across epochs.

The trial's step size is so small that no weight changes: every epoch predicts the
same, so every epoch ties, and Ray keeps only the last checkpoint.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cxrtune.analysis.experiment import read_experiment
from cxrtune.analysis.leaderboard import TEST_COLUMNS, build_leaderboard
from cxrtune.search.cli import EXIT_OK, main
from cxrtune.search.config import load_sweep_config
from cxrtune.search.sweep import run_sweep, start_ray
from cxrtune.spaces import SPACES, register_space
from cxrtune.spaces._spaces import QUICK_RANGES, sample_family_config
from tests.untrusted import plant_pickles

pytestmark = pytest.mark.slow
EPOCHS = 3
FROZEN_SPACE = "test_frozen_weights"
# Adam moves each weight by about lr per step; float32 weights do not feel 1e-30.
FROZEN_LR = 1e-30


@pytest.fixture(scope="module")
def tied_sweep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The experiment dir of one baseline_cnn trial whose weights never change."""
    import ray

    @register_space(FROZEN_SPACE)
    def frozen(trial: Any, families: Any) -> dict[str, Any]:
        return {**sample_family_config(trial, families, QUICK_RANGES), "lr": FROZEN_LR}

    root = tmp_path_factory.mktemp("tied")
    try:
        with pytest.MonkeyPatch.context() as environment:
            # Module-scoped, so the per-test cache fixture has not run yet.
            environment.setenv("CXRTUNE_CACHE_DIR", str(root / "cache"))
            config = load_sweep_config(
                None,
                [
                    f"storage_path={root / 'results'}",
                    "image_size=16",
                    "num_samples=1",
                    f"max_epochs={EPOCHS}",
                    f"grace_period={EPOCHS}",
                    "families=[baseline_cnn]",
                    "synthetic.n=200",
                    "synthetic.size=16",
                    "checkpoints_to_keep=1",
                    f"space={FROZEN_SPACE}",
                    "max_failures=0",
                ],
            )
            start_ray(address=None)
            try:
                outcome = run_sweep(config, name="tied")
            finally:
                ray.shutdown()
            assert outcome.errored == 0
            yield outcome.experiment_dir
    finally:
        del SPACES[FROZEN_SPACE]


def test_the_sweep_tied_every_epoch_and_ray_kept_only_the_last_checkpoint(
    tied_sweep: Path,
) -> None:
    (trial,) = read_experiment(tied_sweep).trials
    assert trial.config["lr"] == FROZEN_LR
    assert trial.results["epoch"].tolist() == list(range(1, EPOCHS + 1))
    assert trial.results["val_macro_auc"].nunique() == 1
    assert trial.results["checkpoint_dir_name"].tolist() == [
        f"checkpoint_{index:06d}" for index in range(EPOCHS)
    ]
    assert trial.checkpoints == {f"checkpoint_{EPOCHS - 1:06d}"}


def test_a_tie_ranks_and_exports_the_checkpoint_ray_kept_item_2(
    tied_sweep: Path, tmp_path: Path
) -> None:
    """Issue item 2, on a real sweep: the chosen checkpoint is one that exists."""
    experiment = tmp_path / "tied"
    shutil.copytree(tied_sweep, experiment)
    leaderboard = build_leaderboard(read_experiment(experiment))
    assert leaderboard.failed.empty
    row = leaderboard.ranked.iloc[0]
    assert row["best_epoch"] == EPOCHS
    assert row[list(TEST_COLUMNS)].notna().all()
    assert leaderboard.checkpoints[row["trial_id"]].is_dir()
    assert main(["export", str(experiment), "--rank", "1", "--out", str(tmp_path / "m")]) == 0
    member = json.loads((tmp_path / "m" / "model.json").read_text())["members"][0]
    assert member["best_epoch"] == EPOCHS
    assert member["checkpoint"].endswith(f"checkpoint_{EPOCHS - 1:06d}")


def test_the_analysis_commands_unpickle_none_of_the_pickles_ray_wrote_item_12(
    tied_sweep: Path, tmp_path: Path
) -> None:
    """Issue item 12, on the files a real sweep leaves: Ray's pickles are never loaded."""
    experiment = tmp_path / "tied"
    shutil.copytree(tied_sweep, experiment)
    ray_pickles = ["tuner.pkl", "searcher-state-*.pkl", "*/params.pkl", "experiment_state-*"]
    assert all(list(experiment.glob(pattern)) for pattern in ray_pickles)
    marker = tmp_path / "unpickled"
    plant_pickles(experiment, marker)
    model = tmp_path / "model"
    splits = pd.read_csv(experiment / "splits.csv", keep_default_na=False)
    image = Path(read_experiment(experiment).dataset.root) / splits["path"].iloc[0]

    assert main(["leaderboard", str(experiment)]) == EXIT_OK
    assert main(["report", str(experiment), "--out", str(tmp_path / "report")]) == EXIT_OK
    assert main(["export", str(experiment), "--rank", "1", "--out", str(model)]) == EXIT_OK
    assert main(["predict", str(model), str(image)]) == EXIT_OK
    assert not marker.exists()

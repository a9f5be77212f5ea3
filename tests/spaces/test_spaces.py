from __future__ import annotations

import sys

import optuna
import pytest

from cxrtune.spaces import FAMILIES, SPACES, get_space, register_space
from cxrtune.trainables.config import TrialConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)


def sample_configs(space_name: str, families: tuple[str, ...], trials: int) -> list[dict]:
    """Run a space through a real Optuna study, as OptunaSearch does, and collect the configs."""
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5))
    configs = []
    for _ in range(trials):
        trial = study.ask()
        fixed = get_space(space_name)(trial, families)
        configs.append({**trial.params, **fixed})
        study.tell(trial, 0.5)
    return configs


@pytest.mark.parametrize("space_name", sorted(SPACES))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_space_yields_valid_trial_configs_for_every_family(
    space_name: str, family: str
) -> None:
    for values in sample_configs(space_name, (family,), trials=8):
        config = TrialConfig.from_dict(values)
        assert config.family == family


@pytest.mark.parametrize("space_name", sorted(SPACES))
def test_the_baseline_is_the_unregularised_control(space_name: str) -> None:
    for values in sample_configs(space_name, ("baseline_cnn",), trials=6):
        assert values["dropout"] == 0.0
        assert values["weight_decay"] == 0.0
        assert values["augment_strength"] == 0.0


def test_regularized_and_vgg16_search_regularisation_and_vgg16_its_depth() -> None:
    regularized = sample_configs("default", ("regularized_cnn",), trials=6)
    vgg = sample_configs("default", ("vgg16",), trials=12)
    assert len({values["dropout"] for values in regularized}) > 1
    assert {"dropout", "weight_decay", "augment_strength", "finetune_blocks"} <= set(vgg[0])
    assert len({values["finetune_blocks"] for values in vgg}) > 1


def test_a_family_subset_restricts_sampling() -> None:
    configs = sample_configs("quick", ("baseline_cnn", "vgg16"), trials=20)
    assert {values["family"] for values in configs} <= {"baseline_cnn", "vgg16"}


def test_unknown_families_are_refused() -> None:
    study = optuna.create_study()
    with pytest.raises(ValueError, match="resnet"):
        get_space("default")(study.ask(), ("resnet",))


def test_an_unknown_space_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="default, quick"):
        get_space("tiny")


def test_registering_a_space_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_space("default")(lambda trial, families: {})


def test_spaces_do_not_import_ray_or_torch() -> None:
    import subprocess

    code = "import sys, cxrtune.spaces; print('ray' in sys.modules, 'torch' in sys.modules)"
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert output.stdout.split() == ["False", "False"]

from __future__ import annotations

import numpy as np
import pytest

from cxrtune.trainables.config import ConfigError, TrialConfig

VALID = {"family": "regularized_cnn", "lr": 1e-3, "batch_size": 32, "imbalance": "oversample"}


def test_a_valid_dict_becomes_a_trial_config_with_defaults() -> None:
    config = TrialConfig.from_dict(VALID)
    assert config.family == "regularized_cnn"
    assert config.dropout == 0.0 and config.weights == "none"


def test_numpy_scalars_from_optuna_are_accepted() -> None:
    config = TrialConfig.from_dict({**VALID, "lr": np.float64(0.01), "batch_size": np.int64(16)})
    assert config.batch_size == 16 and isinstance(config.batch_size, int)


def test_an_unknown_key_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="drop_out"):
        TrialConfig.from_dict({**VALID, "drop_out": 0.2})


def test_a_missing_key_is_an_error_naming_it() -> None:
    values = dict(VALID)
    del values["lr"]
    with pytest.raises(ConfigError, match="lr"):
        TrialConfig.from_dict(values)


@pytest.mark.parametrize(
    ("key", "value"),
    [("batch_size", 32.5), ("lr", "fast"), ("family", 3), ("batch_size", True)],
)
def test_a_wrong_type_is_an_error_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        TrialConfig.from_dict({**VALID, key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("family", "resnet"),
        ("imbalance", "smote"),
        ("dropout", 1.0),
        ("finetune_blocks", 6),
        ("lr", 0.0),
    ],
)
def test_an_out_of_range_value_is_an_error(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        TrialConfig.from_dict({**VALID, key: value})


def test_to_dict_round_trips() -> None:
    config = TrialConfig.from_dict({**VALID, "finetune_blocks": 2, "weights": "/w.pt"})
    assert TrialConfig.from_dict(config.to_dict()) == config

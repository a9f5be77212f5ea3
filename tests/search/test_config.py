from __future__ import annotations

from pathlib import Path

import pytest

from cxrtune.search.config import (
    FamilyResources,
    SweepConfig,
    SweepConfigError,
    load_sweep_config,
    write_sweep_config,
)

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_no_file_gives_the_documented_defaults() -> None:
    config = load_sweep_config(None)
    assert config == SweepConfig()
    assert config.objectives == ["val_covid_recall_at_spec", "val_macro_auc"]
    assert config.scheduler_metric == "val_macro_auc"
    assert set(config.resources) == {"baseline_cnn", "regularized_cnn", "vgg16"}


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").iterdir()), ids=lambda p: p.name)
def test_every_shipped_sweep_file_is_valid(path: Path) -> None:
    assert path.suffix == ".yaml", f"{path.name}: sweep files end in .yaml"
    load_sweep_config(path)


def test_the_gpu_sweep_file_is_the_real_radiography_case_on_shared_gpus() -> None:
    config = load_sweep_config(REPO / "sweeps" / "radiography-gpu.yaml")
    assert config.layout == "radiography" and config.data is not None
    assert config.image_size == 224 and config.weights == "imagenet"
    assert config.space == "default" and config.num_samples >= 100
    assert config.resources["baseline_cnn"].gpus == config.resources["regularized_cnn"].gpus == 0.25
    assert config.resources["vgg16"] == FamilyResources(cpus=2.0, gpus=1.0, workers=1)
    assert config.max_failures >= 1 and config.grace_period < config.max_epochs


def test_an_unknown_key_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(SweepConfigError, match="num_sample"):
        load_sweep_config(write(tmp_path, "num_sample: 10\n"))


def test_an_unknown_nested_key_is_named_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(SweepConfigError, match=r"resources\.vgg16\.gpu"):
        load_sweep_config(write(tmp_path, "resources:\n  vgg16: {gpu: 1}\n"))


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("num_samples: ten\n", "num_samples"),
        ("max_epochs: 2.5\n", "max_epochs"),
        ("families: vgg16\n", "families"),
        ("try_each_family_first: 1\n", "try_each_family_first"),
        ("splits: {val: high}\n", "splits.val"),
    ],
)
def test_a_wrong_type_is_an_error_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(SweepConfigError, match=key.replace(".", r"\.")):
        load_sweep_config(write(tmp_path, text))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("families=[resnet]", "families"),
        ("sampler=random", "sampler"),
        ("space=huge", "space"),
        ("objectives=[val_f1]", "val_f1"),
        ("grace_period=20", "grace_period"),
        ("image_size=30", "image_size"),
        ("splits.val=0.9", "splits"),
        ("resources.resnet.cpus=1", "resources"),
    ],
)
def test_invalid_values_are_errors_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(SweepConfigError, match=message):
        load_sweep_config(None, [override])


def test_set_overrides_reach_nested_keys_and_keep_other_defaults() -> None:
    config = load_sweep_config(None, ["resources.vgg16.gpus=0.5", "families=[vgg16]", "data=null"])
    assert config.resources["vgg16"] == FamilyResources(cpus=1.0, gpus=0.5)
    assert config.resources["baseline_cnn"] == FamilyResources()
    assert config.families == ["vgg16"] and config.data is None


def test_a_malformed_override_is_an_error() -> None:
    with pytest.raises(SweepConfigError, match="key=value"):
        load_sweep_config(None, ["num_samples"])


def test_a_file_that_is_not_a_mapping_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SweepConfigError, match="mapping"):
        load_sweep_config(write(tmp_path, "- just\n- a list\n"))


def test_invalid_yaml_is_an_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(SweepConfigError, match=r"sweep\.yaml"):
        load_sweep_config(write(tmp_path, "name: [unclosed\n"))


def test_the_written_config_reads_back_identical(tmp_path: Path) -> None:
    config = load_sweep_config(None, ["num_samples=3", "resources.vgg16.gpus=1"])
    write_sweep_config(config, tmp_path / "resolved.yaml")
    assert load_sweep_config(tmp_path / "resolved.yaml") == config


def test_a_trial_on_several_gpus_is_declared_as_data_parallel_workers() -> None:
    config = load_sweep_config(None, ["resources.vgg16={cpus: 4, gpus: 1, workers: 2}"])
    assert config.resources["vgg16"] == FamilyResources(cpus=4.0, gpus=1.0, workers=2)
    assert config.resources["baseline_cnn"].workers == 1


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ("{gpus: 2}", r"resources\.vgg16: gpus is per worker.*set workers: 2 and gpus: 1"),
        ("{gpus: 0.5, workers: 2}", r"resources\.vgg16: data-parallel workers .* whole GPU"),
        ("{workers: 0}", r"resources\.vgg16: workers must be at least 1"),
        ("{workers: 1.5}", r"resources\.vgg16\.workers: expected int"),
        ("{cpus: 0}", r"resources\.vgg16: cpus must be > 0"),
    ],
)
def test_resources_a_trial_cannot_use_are_errors_saying_what_to_write(
    resources: str, message: str
) -> None:
    with pytest.raises(SweepConfigError, match=message):
        load_sweep_config(None, [f"resources.vgg16={resources}"])


def test_settings_are_taken_literally_and_win_over_set_overrides() -> None:
    """Item 3: command-line option values are never parsed as YAML; only --set is."""
    config = load_sweep_config(
        None, ["data=/from/set", "num_samples=3"], {"data": "null", "mlflow_uri": "2024"}
    )
    assert config.data == "null" and config.mlflow_uri == "2024" and config.num_samples == 3
    assert load_sweep_config(None, settings={"data": "/scans/ward #2"}).data == "/scans/ward #2"


@pytest.mark.parametrize(
    "storage_path",
    [
        "s3://AKEY:s3cr3tValue@bucket/results",
        "s3://bucket/results?access_key=AKEY&secret_key=s3cr3tValue",
    ],
)
def test_credentials_inside_the_storage_uri_are_refused_without_showing_them(
    storage_path: str,
) -> None:
    """Item 6: keys in storage_path would be written into sweep.yaml and uploaded."""
    with pytest.raises(SweepConfigError, match=r"storage_path: .*AWS credential chain") as error:
        load_sweep_config(None, [f"storage_path={storage_path}"])
    assert "s3cr3tValue" not in str(error.value) and "AKEY" not in str(error.value)


def test_the_written_config_hides_keys_in_the_mlflow_uri(tmp_path: Path) -> None:
    """Item 6: sweep.yaml keeps the MLflow URI without its user-info."""
    config = load_sweep_config(None, settings={"mlflow_uri": "http://me:s3cr3tValue@mlflow:5000"})
    write_sweep_config(config, tmp_path / "sweep.yaml")
    written = (tmp_path / "sweep.yaml").read_text()
    assert "s3cr3tValue" not in written and "mlflow_uri: http://***@mlflow:5000" in written

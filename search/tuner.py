"""Build the Ray Tune ``Tuner`` for a sweep: Optuna search, ASHA, resources, storage.

Everything here is wiring; the space comes from ``cxrtune.spaces`` and the
training from ``cxrtune.trainables``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune import PlacementGroupFactory
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from cxrtune.search.config import SweepConfig
from cxrtune.search.progress import SweepProgress
from cxrtune.spaces import get_space
from cxrtune.trainables.trainable import TrialData, train_trial


def metric_mode(metric: str) -> str:
    """``"min"`` for losses, ``"max"`` for everything else a trial reports."""
    return "min" if metric.endswith("loss") else "max"


@dataclass(frozen=True)
class TrialSpace:
    """The define-by-run function Optuna calls: the sweep's space plus its fixed values.

    A class rather than a closure so the searcher state pickles for resume.
    """

    space: str
    families: tuple[str, ...]
    fixed: tuple[tuple[str, Any], ...]  # values every trial gets (max_epochs, seed, ...)
    vgg16_weights: str  # "none" or a state dict path, resolved on the driver

    def __call__(self, trial: Any) -> dict[str, Any]:
        held = get_space(self.space)(trial, self.families)
        is_vgg16 = trial.params["family"] == "vgg16"
        return {**held, **dict(self.fixed), "weights": self.vgg16_weights if is_vgg16 else "none"}


@dataclass(frozen=True)
class FamilyResourcesFn:
    """Per-trial resource request, looked up by the trial's family."""

    resources: tuple[tuple[str, float, float], ...]  # (family, cpus, gpus)

    def __call__(self, config: dict[str, Any]) -> PlacementGroupFactory:
        for family, cpus, gpus in self.resources:
            if family == config["family"]:
                return PlacementGroupFactory([{"CPU": cpus, "GPU": gpus}])
        raise ValueError(f"no resources configured for family {config['family']!r}")


def trial_dirname(trial: Any) -> str:
    """``<trial id>_<family>``: short, unique and readable."""
    return f"{trial.trial_id}_{trial.config.get('family', 'trial')}"


def build_searcher(config: SweepConfig, vgg16_weights: str) -> OptunaSearch:
    """Seeded Optuna search over the sweep's space, one or two objectives."""
    import optuna

    space = TrialSpace(
        space=config.space,
        families=tuple(config.families),
        fixed=(
            ("max_epochs", config.max_epochs),
            ("seed", config.seed),
            ("optimizer", config.optimizer),
        ),
        vgg16_weights=vgg16_weights,
    )
    if config.sampler == "nsga2":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.NSGAIISampler(seed=config.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=config.seed)
    modes = [metric_mode(metric) for metric in config.objectives]
    # Enqueued trials fix only the family; Optuna samples the rest as usual.
    first_points = (
        [{"family": family} for family in config.families] if config.try_each_family_first else None
    )
    if len(config.objectives) == 1:
        return OptunaSearch(
            space=space,
            metric=config.objectives[0],
            mode=modes[0],
            sampler=sampler,
            points_to_evaluate=first_points,
        )
    return OptunaSearch(
        space=space,
        metric=list(config.objectives),
        mode=modes,
        sampler=sampler,
        points_to_evaluate=first_points,
    )


def build_tuner(
    config: SweepConfig,
    data: TrialData,
    *,
    experiment_name: str,
    storage_path: str,
    vgg16_weights: str,
    progress: SweepProgress,
) -> tune.Tuner:
    """The ``Tuner`` that runs the sweep; ``data`` goes to the object store once."""
    resources = FamilyResourcesFn(
        tuple((family, r.cpus, r.gpus) for family, r in config.resources.items())
    )
    trainable = tune.with_resources(tune.with_parameters(train_trial, data=data), resources)
    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        metric=config.scheduler_metric,
        mode=metric_mode(config.scheduler_metric),
        max_t=config.max_epochs,
        grace_period=config.grace_period,
        reduction_factor=config.reduction_factor,
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=build_searcher(config, vgg16_weights),
            scheduler=scheduler,
            num_samples=config.num_samples,
            max_concurrent_trials=config.max_concurrent_trials or None,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=experiment_name,
            storage_path=storage_path,
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=config.checkpoints_to_keep,
                checkpoint_score_attribute=config.scheduler_metric,
                checkpoint_score_order=metric_mode(config.scheduler_metric),
            ),
            failure_config=tune.FailureConfig(max_failures=config.max_failures),
            callbacks=[progress],
            verbose=0,
        ),
    )

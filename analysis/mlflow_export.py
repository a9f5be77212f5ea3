"""The best trials' models on their MLflow runs.

During a sweep with an ``mlflow_uri``, Ray's ``MLflowLoggerCallback`` gives every
trial one run, in the MLflow experiment named after the experiment dir, holding
its params and per-epoch metrics; the run is named, and tagged ``trial_name``,
``<trainable>_<trial id>``. After the leaderboard is written, ``log_top_models``
adds the chosen checkpoint of the top trials to their runs. MLflow is an optional
extra (``pip install 'cxrtune[mlflow]'``) and is imported only here, when used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit, urlunsplit

import pandas as pd

from cxrtune.analysis.experiment import LEADERBOARD_CSV, ExperimentError, read_experiment
from cxrtune.analysis.leaderboard import build_leaderboard
from cxrtune.analysis.storage import redacted

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = [
    "MODEL_ARTIFACT",
    "MLflowError",
    "credentials_to_environment",
    "find_trial_run",
    "log_top_models",
    "tracking_client",
]

MODEL_ARTIFACT = "model"  # artifact folder of a run that holds the chosen checkpoint.pt
RANK_TAG = "leaderboard_rank"
CHECKPOINT_TAG = "checkpoint"


class MLflowError(RuntimeError):
    """MLflow is missing, refuses the tracking URI, or lacks a run; the message says which."""


def tracking_client(tracking_uri: str) -> MlflowClient:
    """An MLflow client for ``tracking_uri``; a local store (``sqlite:``, ``file:``) is opened.

    Recent MLflow refuses ``file:`` stores unless ``MLFLOW_ALLOW_FILE_STORE=true``.
    """
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError as error:
        raise MLflowError(
            "MLflow is not installed; install it with: pip install 'cxrtune[mlflow]'"
        ) from error
    try:
        return MlflowClient(tracking_uri=tracking_uri)
    except MlflowException as error:
        raise MLflowError(f"MLflow refuses {redacted(tracking_uri)!r}: {error.message}") from error


def credentials_to_environment(tracking_uri: str) -> str:
    """``tracking_uri`` without its user-info, which goes to this process's environment.

    A user name and password written into the URI (``http://user:password@host``) are
    set as ``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD``, which MLflow
    reads for every request. Ray pickles the sweep's MLflow callback into the
    experiment dir (``tuner.pkl``): given the URI this returns, it holds no secret.
    """
    parts = urlsplit(tracking_uri)
    if "@" not in parts.netloc:
        return tracking_uri
    user_info, _, host = parts.netloc.rpartition("@")
    user, _, password = user_info.partition(":")
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
    os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    return urlunsplit(parts._replace(netloc=host))


def find_trial_run(client: MlflowClient, experiment_id: str, trial_id: str) -> str | None:
    """The id of the MLflow run of ``trial_id``; the latest, when a resumed sweep made two."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.trial_name LIKE '%{trial_id}'",
        order_by=["attributes.start_time DESC"],
    )
    for run in runs:
        if run.data.tags.get("trial_name", "").endswith(f"_{trial_id}"):
            return str(run.info.run_id)
    return None


def log_top_models(experiment_dir: str | Path, mlflow_uri: str, top: int = 3) -> dict[str, str]:
    """Log the chosen checkpoint of the ``top`` ranked trials on their MLflow runs.

    The ranks come from ``leaderboard.csv``, so write the leaderboard first; the
    checkpoint of each trial is the one the leaderboard chose (best ``scheduler_metric``
    on val). Each checkpoint folder becomes the run's ``model`` artifact
    (``model/checkpoint.pt``, loadable with
    ``cxrtune.trainables.checkpoints.model_from_checkpoint``), and the run is tagged
    with its ``leaderboard_rank`` and ``checkpoint`` name. Returns trial id -> run id.
    A ranked trial without a run (the sweep had no ``mlflow_uri``, or another one) is
    an ``MLflowError``.
    """
    directory = Path(experiment_dir).expanduser().resolve()
    leaderboard_path = directory / LEADERBOARD_CSV
    if not leaderboard_path.is_file():
        raise ExperimentError(f"{leaderboard_path} is missing; write the leaderboard first")
    # Read as text: a trial id such as "1234e567" would otherwise become a number.
    ranked = pd.read_csv(leaderboard_path, dtype={"trial_id": str}).sort_values("rank")
    # Ranking without the test evaluation is cheap and chooses the same checkpoints.
    checkpoints = build_leaderboard(read_experiment(directory), evaluate_test=False).checkpoints
    client = tracking_client(mlflow_uri)
    experiment = client.get_experiment_by_name(directory.name)
    if experiment is None:
        raise MLflowError(
            f"{redacted(mlflow_uri)} has no MLflow experiment named {directory.name!r}"
        )
    logged: dict[str, str] = {}
    chosen = ranked.head(top)
    for trial_id, rank in zip(chosen["trial_id"].tolist(), chosen["rank"].tolist(), strict=True):
        checkpoint = checkpoints.get(trial_id)
        if checkpoint is None or not checkpoint.is_dir():
            raise ExperimentError(f"{directory}: the chosen checkpoint of trial {trial_id} is gone")
        run_id = find_trial_run(client, experiment.experiment_id, trial_id)
        if run_id is None:
            raise MLflowError(
                f"MLflow experiment {directory.name!r} at {redacted(mlflow_uri)} has no run of "
                f"trial {trial_id}; was the sweep run with this mlflow_uri?"
            )
        client.log_artifacts(run_id, str(checkpoint), artifact_path=MODEL_ARTIFACT)
        client.set_tag(run_id, RANK_TAG, str(rank))
        client.set_tag(run_id, CHECKPOINT_TAG, checkpoint.name)
        logged[trial_id] = run_id
    return logged

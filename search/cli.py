"""The ``cxrtune`` command line.

Exit codes: 0 done; 1 the sweep ran but no trial produced a result; 2 bad input
(sweep file, dataset, arguments, or images ``predict`` could not read); 130
interrupted. Heavy libraries are imported inside the commands, so
``cxrtune --help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrtune.trainables.config import GROUPINGS

if TYPE_CHECKING:
    from cxrtune.analysis.leaderboard import Leaderboard

__all__ = ["EXIT_BAD_INPUT", "EXIT_OK", "build_parser", "finish_with_leaderboard", "main"]

EXIT_OK = 0
EXIT_NO_RESULTS = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXPERIMENT_DIR_HELP = "an experiment dir: a folder, or s3://bucket/prefix/<experiment>"


class InputError(Exception):
    """Bad input from the user: reported as one message, exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxrtune",
        description="Hyperparameter search for chest X-ray COVID-19 classifiers "
        "(Ray Tune + Optuna), ranked by COVID recall and macro AUC.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sweep = commands.add_parser(
        "sweep",
        help="run a hyperparameter sweep and print its leaderboard",
        description="Run a sweep described by a sweep YAML file, then rank its trials. "
        "Without --data (or `data:` in the file) the embedded synthetic dataset is used.",
    )
    sweep.add_argument(
        "sweep_file", nargs="?", type=Path, help="sweep YAML (default: built-in defaults)"
    )
    sweep.add_argument(
        "--data",
        help="dataset folder (one folder per class, or the Radiography Database) or CSV manifest",
    )
    add_ingest_options(sweep)
    sweep.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a sweep-file key, e.g. --set num_samples=50 --set resources.vgg16.gpus=1",
    )
    sweep.add_argument(
        "--test-source",
        metavar="NAME",
        help="hold out every image of source NAME as the test split (an external-site test)",
    )
    sweep.add_argument("--name", help="experiment folder name (default: <name>-<timestamp>)")
    sweep.add_argument(
        "--address", help="address of a running Ray cluster (default: start one locally)"
    )
    sweep.add_argument("--top", type=int, default=20, help="leaderboard rows to print (default 20)")
    sweep.add_argument(
        "--wide",
        action="store_true",
        help="print every leaderboard column, not the 120-column table",
    )
    sweep.add_argument(
        "--mlflow-uri",
        help="also log every trial to this MLflow tracking URI, and the top 3 models "
        "(needs the mlflow extra)",
    )
    sweep.set_defaults(handler=run_sweep_command)

    resume = commands.add_parser(
        "resume",
        help="finish an interrupted sweep and print its leaderboard",
        description="Finish a sweep whose command was killed or lost its connection, from its "
        "experiment dir. Finished trials are kept, unfinished ones continue from their last "
        "checkpoint, trials that errored stay errored, and Optuna's study goes on where it "
        "stopped until the sweep has num_samples trials. The data must be unchanged.",
    )
    resume.add_argument("experiment_dir")
    resume.add_argument(
        "--address", help="address of a running Ray cluster (default: start one locally)"
    )
    resume.add_argument(
        "--top", type=int, default=20, help="leaderboard rows to print (default 20)"
    )
    resume.add_argument(
        "--wide",
        action="store_true",
        help="print every leaderboard column, not the 120-column table",
    )
    resume.set_defaults(handler=run_resume_command)

    leaderboard = commands.add_parser(
        "leaderboard",
        help="rank the trials of an experiment dir and evaluate them on the test split",
        description="Rank an experiment's trials on validation metrics, evaluate the top trials' "
        "best-validation checkpoints on the held-out test split, and write leaderboard.csv "
        "and leaderboard.md into the experiment dir. No running Ray is needed.",
    )
    leaderboard.add_argument("experiment_dir", help=EXPERIMENT_DIR_HELP)
    leaderboard.add_argument("--top", type=int, default=None, help="rows to print (default: all)")
    leaderboard.add_argument("--format", choices=("table", "csv", "md"), default="table")
    leaderboard.add_argument(
        "--wide",
        action="store_true",
        help="print every leaderboard column, not the 120-column table",
    )
    add_evaluate_top_option(leaderboard)
    leaderboard.set_defaults(handler=run_leaderboard_command)

    report = commands.add_parser(
        "report",
        help="write an HTML report with figures of an experiment",
        description="Write one self-contained HTML report (figures embedded, opens offline) and "
        "the figures as PNG: leaderboard, Pareto front, ROC curves, confusion matrices, learning "
        "curves, hyperparameter importance, per-family and imbalance-strategy comparisons.",
    )
    report.add_argument("experiment_dir", help=EXPERIMENT_DIR_HELP)
    report.add_argument("--top", type=int, default=5, help="trials shown in detail (default 5)")
    report.add_argument("--out", type=Path, help="output folder (default: EXPERIMENT_DIR/report)")
    add_evaluate_top_option(report)
    report.set_defaults(handler=run_report_command)

    export = commands.add_parser(
        "export",
        help="copy a trained model (or a top-K ensemble) out of an experiment",
        description="Write one folder holding the chosen checkpoint's weights, its config, class "
        "names, preprocessing, operating-point threshold and metrics, for `cxrtune predict`.",
    )
    export.add_argument("experiment_dir", help=EXPERIMENT_DIR_HELP)
    which = export.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", help="the trial id to export")
    which.add_argument("--rank", type=int, help="the leaderboard rank to export (1 = best)")
    which.add_argument("--ensemble", type=int, metavar="K", help="average the top K trials")
    export.add_argument("--out", type=Path, required=True, help="new output folder")
    export.set_defaults(handler=run_export_command)

    predict = commands.add_parser(
        "predict",
        help="classify X-ray images with an exported model",
        description="Print each image's class probabilities and the thresholded COVID call. "
        "Accepts PNG, JPEG and DICOM files and folders; unreadable files are reported and "
        "skipped.",
    )
    predict.add_argument("model_dir", type=Path, help="a folder written by `cxrtune export`")
    predict.add_argument("inputs", type=Path, nargs="+", help="images or folders of images")
    predict.add_argument("--gradcam", type=Path, metavar="OUT_DIR", help="write Grad-CAM overlays")
    predict.add_argument("--csv", type=Path, metavar="OUT.csv", help="also write the table as CSV")
    predict.set_defaults(handler=run_predict_command)

    data = commands.add_parser("data", help="dataset tools", description="Dataset tools.")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    synth = data_commands.add_parser(
        "synth",
        help="write the embedded synthetic four-class dataset (PNG, ImageFolder layout)",
        description="Write a synthetic, chest-X-ray-like four-class dataset (COVID the minority) "
        "as PNG files in ImageFolder layout. It is for demos and tests, not for medical use.",
    )
    synth.add_argument("directory", type=Path, help="output folder (must not exist or be empty)")
    synth.add_argument("--n", type=int, default=1200, help="number of images (default 1200)")
    synth.add_argument("--size", type=int, default=128, help="pixels per side (default 128)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.set_defaults(handler=run_synth_command)

    inspect = data_commands.add_parser(
        "inspect",
        help="report what ingest finds in a dataset: counts, sizes, groups, duplicates, bad files",
        description="Decode a dataset as a sweep would (reusing the cache), print the ingest "
        "report, then find the positive class and split it with a sweep's default fractions "
        "and seed. Exit code 2 when a sweep would refuse the dataset.",
    )
    inspect.add_argument("data", type=Path, help="dataset folder or CSV manifest")
    inspect.add_argument(
        "--size", type=int, default=64, help="resolution to decode at (default 64)"
    )
    inspect.add_argument(
        "--positive-class",
        default="COVID",
        help="the class whose recall a sweep ranks (default COVID; `positive_class` in a "
        "sweep file)",
    )
    add_ingest_options(inspect)
    inspect.set_defaults(handler=run_inspect_command)
    return parser


def positive_integer(text: str) -> int:
    """An argparse type: a whole number of at least 1, or a usage error saying so."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def add_evaluate_top_option(parser: argparse.ArgumentParser) -> None:
    """``--evaluate-top N``, shared by ``leaderboard`` and ``report``."""
    parser.add_argument(
        "--evaluate-top",
        type=positive_integer,
        metavar="N",
        help="evaluate on test only the top N trials by val rank; the others are marked not "
        "evaluated (default: the sweep file's evaluate_top, else every trial up to 100, "
        "else the top 100)",
    )


def add_ingest_options(parser: argparse.ArgumentParser) -> None:
    """The options that decide how a dataset is read, shared by ``sweep`` and ``data inspect``."""
    parser.add_argument(
        "--layout", help="dataset layout: imagefolder, radiography or manifest (default: detect)"
    )
    parser.add_argument(
        "--group-by",
        choices=GROUPINGS,
        help="keep each patient (default) or source in one split",
    )
    parser.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="leave unreadable images out (they are listed) instead of stopping",
    )
    parser.add_argument(
        "--drop-conflicting-duplicates",
        action="store_true",
        help="leave out every copy of an image found under two labels, or in two splits of a "
        "manifest, instead of stopping",
    )
    parser.add_argument(
        "--manifest-encoding",
        help="text encoding of a CSV manifest, e.g. latin-1 (default: UTF-8, BOM or not)",
    )


def ingest_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ingest options given on the command line, as sweep-file keys and literal values."""
    settings: dict[str, Any] = {}
    if args.layout is not None:
        settings["layout"] = args.layout
    if args.group_by is not None:
        settings["group_by"] = args.group_by
    if args.skip_bad_images:
        settings["skip_bad_images"] = True
    if args.drop_conflicting_duplicates:
        settings["drop_conflicting_duplicates"] = True
    if args.manifest_encoding:
        settings["manifest_encoding"] = args.manifest_encoding
    return settings


def run_inspect_command(args: argparse.Namespace) -> int:
    """Ingest, then find the positive class and split as a sweep with default settings would."""
    from cxrtune.search.config import load_sweep_config
    from cxrtune.search.sweep import describe_data, ingest_with_progress, split_data
    from cxrtune.trainables.data import DataError

    root = args.data.expanduser().resolve()
    config = load_sweep_config(
        None,
        settings={
            **ingest_settings(args),
            "image_size": args.size,
            "data": str(root),
            "positive_class": args.positive_class,
        },
    )
    try:
        dataset, report, cache_path, layout = ingest_with_progress(config, root)
        print(report.to_text())
        print(f"Cache: {cache_path}")
        prepared = split_data(config, root, dataset, report, cache_path, layout)
    except DataError as error:
        print(f"cxrtune: the dataset would be refused: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print("\nAs a sweep with the default split fractions and seed would use it:")
    print(describe_data(prepared.info))
    return EXIT_OK


def run_sweep_command(args: argparse.Namespace) -> int:
    from cxrtune.search.config import load_sweep_config
    from cxrtune.search.sweep import run_sweep

    # Only --set values are YAML; an option's value is taken literally ("ward #2", "2024").
    settings = ingest_settings(args)
    if args.data is not None:
        settings["data"] = args.data
    if args.mlflow_uri is not None:
        settings["mlflow_uri"] = args.mlflow_uri
    if args.test_source is not None:
        settings["test_source"] = args.test_source
    config = load_sweep_config(args.sweep_file, args.overrides, settings)
    outcome = run_sweep(config, name=args.name, address=args.address)
    return finish_with_leaderboard(
        outcome.experiment_dir, config.mlflow_uri, top=args.top, wide=args.wide
    )


def run_resume_command(args: argparse.Namespace) -> int:
    from cxrtune.analysis.experiment import SWEEP_FILE
    from cxrtune.analysis.storage import REDACTED_KEYS
    from cxrtune.search.config import load_sweep_config
    from cxrtune.search.sweep import resume_sweep

    outcome = resume_sweep(args.experiment_dir, address=args.address)
    config = load_sweep_config(outcome.experiment_dir / SWEEP_FILE)
    mlflow_uri = config.mlflow_uri
    if mlflow_uri and f"{REDACTED_KEYS}@" in mlflow_uri:
        # The resumed trials log through the URI without its keys, as the sweep left it.
        mlflow_uri = mlflow_uri.replace(f"{REDACTED_KEYS}@", "", 1)
        if "MLFLOW_TRACKING_PASSWORD" not in os.environ:
            print(
                "The sweep's mlflow_uri carried keys, which the experiment dir does not keep: "
                "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to log to MLflow; "
                "the top models are not logged",
                file=sys.stderr,
            )
            mlflow_uri = None
    return finish_with_leaderboard(outcome.experiment_dir, mlflow_uri, top=args.top, wide=args.wide)


def finish_with_leaderboard(
    experiment_dir: Path | str, mlflow_uri: str | None, *, top: int, wide: bool = False
) -> int:
    """Rank a finished sweep, write and print its leaderboard; exit 1 when nothing ranked.

    ``experiment_dir`` may be an ``s3://`` URI: the ranking runs on a local mirror.
    """
    from cxrtune.analysis.experiment import local_experiment_dir, read_experiment
    from cxrtune.analysis.leaderboard import build_leaderboard, write_leaderboard
    from cxrtune.analysis.storage import joined, redacted
    from cxrtune.search.held_out import ray_evaluator

    print("\nEvaluating the top trials' chosen checkpoints on the held-out test split...")
    with local_experiment_dir(experiment_dir) as local_dir:
        # The sweep's Ray is still connected: its GPUs evaluate the checkpoints in parallel.
        leaderboard = build_leaderboard(
            read_experiment(local_dir), evaluate=ray_evaluator(experiment_dir, local_dir)
        )
        write_leaderboard(leaderboard, local_dir)
        print()
        print_leaderboard_table(leaderboard, top=top, wide=wide)
        if mlflow_uri and len(leaderboard.ranked):
            from cxrtune.analysis.mlflow_export import log_top_models

            logged = log_top_models(local_dir, mlflow_uri)
            print(f"The top {len(logged)} models were logged to MLflow at {redacted(mlflow_uri)}")
    written = joined(experiment_dir, "leaderboard.csv")
    print(f"\nLeaderboard written to {written} and leaderboard.md")
    if len(leaderboard.ranked):
        print_next_commands(str(experiment_dir))
    return EXIT_OK if len(leaderboard.ranked) else EXIT_NO_RESULTS


def run_leaderboard_command(args: argparse.Namespace) -> int:
    from cxrtune.analysis.experiment import local_experiment_dir, read_experiment
    from cxrtune.analysis.leaderboard import (
        build_leaderboard,
        format_leaderboard,
        write_leaderboard,
    )

    with local_experiment_dir(args.experiment_dir) as experiment_dir:
        experiment = read_experiment(experiment_dir)
        leaderboard = build_leaderboard(experiment, evaluate_top=args.evaluate_top)
        write_leaderboard(leaderboard, experiment.directory)
    if args.format == "table":
        print_leaderboard_table(leaderboard, top=args.top, wide=args.wide)
        if len(leaderboard.ranked):
            print_next_commands(str(args.experiment_dir))
    else:
        print(format_leaderboard(leaderboard, top=args.top, style=args.format), end="")
    return EXIT_OK if len(leaderboard.ranked) else EXIT_NO_RESULTS


def print_leaderboard_table(leaderboard: Leaderboard, *, top: int | None, wide: bool) -> None:
    """The 120-column table, or with ``wide`` every column."""
    from cxrtune.analysis.leaderboard import format_leaderboard
    from cxrtune.analysis.terminal import print_leaderboard

    if wide:
        print(format_leaderboard(leaderboard, top=top))
    else:
        print_leaderboard(leaderboard, top=top)


def print_next_commands(experiment_dir: str) -> None:
    from cxrtune.analysis.storage import redacted
    from cxrtune.analysis.terminal import cxrtune_program, next_commands

    name = experiment_dir.rstrip("/").rsplit("/", 1)[-1]
    program = cxrtune_program(sys.argv[0], shutil.which("cxrtune"))
    print("\nNext:")
    for command in next_commands(redacted(experiment_dir), name, program):
        print(f"  {command}")


def run_report_command(args: argparse.Namespace) -> int:
    from cxrtune.analysis.experiment import local_experiment_dir
    from cxrtune.analysis.outputs import writable_folder
    from cxrtune.analysis.report import write_report
    from cxrtune.analysis.storage import joined

    if args.out is not None:
        writable_folder(args.out, option="--out")
    with local_experiment_dir(args.experiment_dir) as experiment_dir:
        html = write_report(
            experiment_dir, top=args.top, out_dir=args.out, evaluate_top=args.evaluate_top
        )
    # Named where it lives: in the experiment dir (a local copy's file under a URI), or --out.
    written = (
        str(html)
        if args.out is not None
        else joined(
            args.experiment_dir, html.relative_to(experiment_dir.expanduser().resolve()).as_posix()
        )
    )
    print(f"Report written to {written}")
    return EXIT_OK


def run_export_command(args: argparse.Namespace) -> int:
    from cxrtune.analysis.experiment import local_experiment_dir
    from cxrtune.analysis.export import export_model
    from cxrtune.analysis.outputs import writable_parent

    writable_parent(args.out, option="--out")
    with local_experiment_dir(args.experiment_dir) as experiment_dir:
        out = export_model(
            experiment_dir, args.out, trial_id=args.trial, rank=args.rank, ensemble=args.ensemble
        )
    print(f"Model written to {out}")
    return EXIT_OK


def run_predict_command(args: argparse.Namespace) -> int:
    """Exit 0 when every input was classified, 2 when some could not be read."""
    from cxrtune.analysis.export import load_exported
    from cxrtune.analysis.gradcam import write_gradcam_overlays
    from cxrtune.analysis.outputs import writable_file, writable_folder
    from cxrtune.analysis.predict import predict_paths

    if args.csv:
        writable_file(args.csv, option="--csv")
    if args.gradcam:
        writable_folder(args.gradcam, option="--gradcam")
    model = load_exported(args.model_dir)
    table, bad_files = predict_paths(model, args.inputs)
    if len(table):
        print(table.to_string(index=False, float_format=lambda value: f"{value:.3f}"))
    for path, reason in bad_files:
        print(f"cxrtune: cannot read {path}: {reason}", file=sys.stderr)
    if args.csv:
        table.to_csv(args.csv, index=False)
        print(f"Predictions written to {args.csv}")
    if args.gradcam and len(table):
        overlays = write_gradcam_overlays(model, list(table["path"]), args.gradcam)
        print(f"{len(overlays)} Grad-CAM overlays written to {args.gradcam}")
    return EXIT_BAD_INPUT if bad_files else EXIT_OK


def run_synth_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cxrtune.analysis.outputs import writable_folder
    from cxrtune.trainables.synthetic import write_synthetic_dataset

    writable_folder(args.directory, option="data synth")
    with tqdm(total=args.n, desc="Writing synthetic images", unit="img", file=sys.stderr) as bar:
        counts = write_synthetic_dataset(
            args.directory,
            n=args.n,
            size=args.size,
            seed=args.seed,
            progress=lambda done, total: bar.update(done - bar.n),
        )
    listing = ", ".join(f"{name} {count}" for name, count in counts.items())
    print(f"Wrote {sum(counts.values())} SYNTHETIC images to {args.directory} ({listing})")
    return EXIT_OK


def _input_error_types() -> tuple[type[BaseException], ...]:
    from cxrtune.analysis.experiment import ExperimentError
    from cxrtune.analysis.export import ExportError
    from cxrtune.analysis.outputs import OutputError
    from cxrtune.analysis.storage import StorageError
    from cxrtune.search.config import SweepConfigError
    from cxrtune.trainables.config import ConfigError
    from cxrtune.trainables.data import DataError
    from cxrtune.trainables.models import WeightsUnavailableError

    return (
        SweepConfigError,
        ConfigError,
        DataError,
        ExperimentError,
        ExportError,
        OutputError,
        StorageError,
        WeightsUnavailableError,
        FileNotFoundError,
        FileExistsError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cxrtune`` console script."""
    args = build_parser().parse_args(argv)
    if args.command in ("sweep", "resume") and not args.address:
        from cxrtune.search.ray_environment import use_loopback_ray

        use_loopback_ray()
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("cxrtune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if isinstance(error, _input_error_types()):
            print(f"cxrtune: error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise


if __name__ == "__main__":
    sys.exit(main())

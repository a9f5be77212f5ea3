"""The experiment report: one self-contained HTML file, and each figure as a PNG beside it.

``write_report`` reads an experiment dir, builds its leaderboard (evaluating any chosen
checkpoint not yet evaluated, as ``cxrtune leaderboard`` does), computes the tables of
``cxrtune.analysis.report_tables``, draws them with ``cxrtune.analysis.plots`` and lays them out.
Figures are embedded as base64 PNG ``data:`` URIs and the style sheet is inline, so the file
opens offline and can be mailed on its own; nothing in it loads from anywhere else.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from cxrtune.analysis import plots, report_tables
from cxrtune.analysis.experiment import (
    INGEST_REPORT_TEXT,
    OPTUNA_JOURNAL,
    Experiment,
    read_experiment,
)
from cxrtune.analysis.leaderboard import Leaderboard, build_leaderboard, first_line
from cxrtune.analysis.ranking import DEFAULT_OBJECTIVES
from cxrtune.analysis.terminal import next_commands
from cxrtune.trainables.atomic import write_atomically

__all__ = ["REPORT_DIR", "REPORT_FILE", "write_report"]

REPORT_DIR = "report"  # under the experiment dir, unless the caller names another folder
REPORT_FILE = "report.html"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto;
       max-width: 1200px; padding: 1em 2em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
h3 { margin-top: 1.6em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
nav ul { columns: 2; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.55em; text-align: left;
         white-space: nowrap; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 0.8em 0; display: inline-block; vertical-align: top; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; max-width: 60em; }
.note { color: #8a5300; background: #fff6e5; padding: 0.5em 0.8em; border-left: 4px solid
        #f0a020; }
"""


class _Figures:
    """Writes each figure as a PNG into the report folder and embeds the same bytes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.written: list[Path] = []

    def embed(self, name: str, figure: Figure, alt: str, caption: str) -> str:
        data = plots.png_bytes(figure)
        path = self.directory / f"{_safe_name(name)}.png"
        path.write_bytes(data)
        self.written.append(path)
        source = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        return (
            f'<figure id="figure-{_safe_name(name)}"><img src="{source}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _html_table(
    header: Sequence[str],
    rows: Iterable[Sequence[str]],
    numeric: Sequence[bool],
    *,
    row_headers: bool = False,
) -> str:
    """A plain HTML table of strings; numeric columns right-aligned, everything escaped."""
    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    lines = []
    for row in rows:
        cells = []
        for position, (cell, is_number) in enumerate(zip(row, numeric, strict=True)):
            tag = "th" if row_headers and position == 0 else "td"
            kind = ' class="num"' if is_number else ""
            cells.append(f"<{tag}{kind}>{html.escape(cell)}</{tag}>")
        lines.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(lines)}</tbody></table></div>"
    )


def _is_numeric(column: pd.Series) -> bool:
    return column.dtype.kind in "iuf"


def _table(table: pd.DataFrame) -> str:
    """A table with numbers formatted as the leaderboard formats them."""
    shown = report_tables.display_table(table)
    numeric = [_is_numeric(table[column]) for column in shown.columns]
    return _html_table(list(shown.columns), shown.itertuples(index=False), numeric)


def _side_by_side(table: pd.DataFrame, key: str) -> str:
    """One column per ``key`` value and one row per other column, for a side-by-side read."""
    shown = report_tables.display_table(table)
    rows = [[column, *shown[column]] for column in shown.columns if column != key]
    numeric = [False, *[True] * len(shown)]
    return _html_table([key, *shown[key]], rows, numeric, row_headers=True)


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _section(anchor: str, title: str, parts: Sequence[str]) -> tuple[str, str, str]:
    body = f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{"".join(parts)}</section>'
    return anchor, title, body


def _summary_section(
    experiment: Experiment, leaderboard: Leaderboard, objectives: Sequence[str]
) -> tuple[str, str, str]:
    """The decision first: the recommended trial, the best of each family, what to run next."""
    summary = report_tables.decision_summary(leaderboard.ranked, objectives)
    if summary.empty:
        return _section("summary", "Summary", [_note("No trial reported a result.")])
    numeric = [heading not in ("", "trial", "family") for heading in summary.columns]
    directory = experiment.directory
    commands = next_commands(str(directory), directory.name)[1:]  # this is the report
    parts = [
        "<p>Recommended: the rank-1 trial, ranked on validation. Test figures are held out: "
        "COVID recall at the operating point chosen on val, and macro AUC, each with its "
        "95% bootstrap interval.</p>",
        _html_table(list(summary.columns), summary.itertuples(index=False), numeric),
        "<p>Next: export the recommended model and classify new images.</p>",
        f"<pre>{html.escape(chr(10).join(commands))}</pre>",
    ]
    return _section("summary", "Summary", parts)


def _leaderboard_section(leaderboard: Leaderboard, top: int) -> tuple[str, str, str]:
    ranked = leaderboard.ranked
    parts = [f"<pre>{html.escape(leaderboard.header)}</pre>"]
    if len(ranked):
        untested = (
            int((~ranked["test_evaluated"].astype(bool)).sum()) if "test_evaluated" in ranked else 0
        )
        parts.append(
            f"<p>The top {min(top, len(ranked))} of {len(ranked)} ranked trials; "
            "test columns show the estimate and its 95% bootstrap interval."
            + (
                f" Test was evaluated for the top {len(ranked) - untested} only (evaluate_top)."
                if untested
                else ""
            )
            + "</p>"
        )
        parts.append(_table(ranked.head(top)))
    else:
        parts.append(_note("No trial reported a result."))
    if len(leaderboard.failed):
        failed = leaderboard.failed.assign(error=leaderboard.failed["error"].map(first_line))
        parts += [f"<h3>{len(failed)} trial(s) failed</h3>", _table(failed)]
    return _section("leaderboard", "Leaderboard", parts)


def _data_section(experiment_dir: Path, split_counts: pd.DataFrame) -> tuple[str, str, str]:
    parts = ["<h3>Images per class and split</h3>", _table(split_counts)]
    if warning := report_tables.read_shortcut_warning(experiment_dir):
        parts.insert(0, _note(warning))
    ingest = report_tables.read_ingest_report(experiment_dir)
    parts.append("<h3>Ingest report</h3>")
    if ingest is None:
        parts.append(_note(f"No {INGEST_REPORT_TEXT} in the experiment dir."))
    else:
        parts.append(f"<pre>{html.escape(ingest)}</pre>")
    return _section("data", "Data and splits", parts)


def _trial_sections(
    experiment: Experiment, leaderboard: Leaderboard, top: int, figures: _Figures
) -> tuple[str, str, str]:
    records = {record.trial_id: record for record in experiment.trials}
    class_names = experiment.dataset.class_names
    positive_index = experiment.dataset.positive_index
    if len(class_names) == 2:
        positive, other = class_names[positive_index], class_names[1 - positive_index]
        roc_caption = f"ROC curve of {positive} against {other} on test; AUC in the legend."
    else:
        roc_caption = "One-vs-rest ROC curve of each class on test; AUC in the legend."
    parts = [
        "<p>For each of the top trials, its chosen (best-validation) checkpoint on the held-out "
        "test split, and its training history. The learning curves mark the chosen epoch, and "
        "the last epoch of a trial ASHA stopped before max_epochs.</p>"
    ]
    if leaderboard.ranked.empty:
        parts.append(_note("No trial reported a result."))
    for row in leaderboard.ranked.head(top).itertuples():
        trial_id, family = str(row.trial_id), str(row.family)
        name = f"trial_{row.rank:02d}_{trial_id}"
        label = f"#{row.rank} {trial_id} ({family})"
        parts.append(f'<h3 id="{_safe_name(name)}">{html.escape(label)}</h3>')
        test = leaderboard.predictions.get(trial_id, {}).get("test")
        if test is None and not bool(getattr(row, "test_evaluated", True)):
            parts.append(
                _note("Not evaluated on test: below the top evaluate_top trials by val rank.")
            )
        elif test is None:
            parts.append(_note("No saved test predictions: the chosen checkpoint was not found."))
        else:
            parts.append(
                figures.embed(
                    f"{name}_roc",
                    plots.plot_roc(
                        report_tables.roc_table(test, class_names, positive_index),
                        f"{label}: ROC on test",
                    ),
                    f"ROC curves on test of {label}",
                    roc_caption,
                )
            )
            parts.append(
                figures.embed(
                    f"{name}_confusion",
                    plots.plot_confusion(
                        report_tables.confusion_table(test, class_names), f"{label}: test, argmax"
                    ),
                    f"Confusion matrix on test of {label}",
                    "Confusion matrix of argmax predictions on test: counts, and each row "
                    "divided by the images of its true class (the diagonal is recall).",
                )
            )
        curves = report_tables.learning_curves(
            records[trial_id], experiment.sweep, int(row.best_epoch)
        )
        parts.append(
            figures.embed(
                f"{name}_learning_curves",
                plots.plot_learning_curves(curves, f"{label}: per epoch"),
                f"Learning curves of {label}",
                f"Ran {row.epochs} epoch(s); the checkpoint of epoch {row.best_epoch} was chosen"
                + ("; stopped early by ASHA." if bool(curves["stopped_early"].any()) else "."),
            )
        )
    return _section("top-trials", f"Top {top} trials in detail", parts)


def _importance_section(
    experiment_dir: Path, objectives: Sequence[str], figures: _Figures
) -> tuple[str, str, str]:
    study, reason = report_tables.read_search_study(experiment_dir)
    if study is None:
        return _section("importance", "Hyperparameter importance", [_note(reason)])
    importance = report_tables.parameter_importance(study, objectives)
    slices = report_tables.parameter_slices(study, objectives)
    complete = slices["trial_number"].nunique()
    parts = [
        f"<p>From the sweep's Optuna study ({OPTUNA_JOURNAL}, {complete} complete trials). "
        "Importance is Optuna's fANOVA evaluator, per objective. 'all families' covers the "
        "parameters every trial shares with the same range; each family with two or more trials "
        "is also shown on its own, where its own parameters count. The study holds the values "
        "Optuna was told when each trial ended (its last epoch), not the leaderboard's "
        "best-epoch values.</p>"
    ]
    if importance.empty:
        parts.append(_note("No importance could be computed: each objective took a single value."))
    else:
        parts.append(
            figures.embed(
                "importance",
                plots.plot_importance(importance),
                "Hyperparameter importance per objective",
                "fANOVA importance of each parameter, per scope; the bars of one objective sum "
                "to 1 within a scope.",
            )
        )
    names = report_tables.objective_names(study, objectives)
    parts.append(
        figures.embed(
            "slices",
            plots.plot_slices(slices, names),
            "Objective values against each hyperparameter",
            "Slice view: every complete trial's objective values against each parameter it "
            "sampled, coloured by family.",
        )
    )
    return _section("importance", "Hyperparameter importance", parts)


def _page(title: str, sections: Sequence[tuple[str, str, str]]) -> str:
    contents = "".join(
        f'<li><a href="#{anchor}">{html.escape(name)}</a></li>' for anchor, name, _ in sections
    )
    body = "".join(section for _, _, section in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # An empty icon, so a browser does not go looking for /favicon.ico.
        '<link rel="icon" href="data:,">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1><nav><ul>{contents}</ul></nav>{body}</body></html>\n"
    )


def write_report(
    experiment_dir: str | Path,
    *,
    top: int = 5,
    out_dir: str | Path | None = None,
    evaluate_top: int | None = None,
) -> Path:
    """Write ``report.html`` and every figure as PNG into ``out_dir``; return the HTML's path.

    ``out_dir`` defaults to ``EXPERIMENT_DIR/report/``; ``top`` trials get detailed figures.
    ``evaluate_top`` is the leaderboard's (``build_leaderboard``): trials below it have no
    test figures.
    Hyperparameter importance needs the sweep's Optuna journal with at least two complete
    trials; without one that section says why, and the rest of the report stands.
    """
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    experiment = read_experiment(experiment_dir)
    leaderboard = build_leaderboard(experiment, evaluate_top=evaluate_top)
    directory = Path(out_dir) if out_dir is not None else experiment.directory / REPORT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    figures = _Figures(directory)
    ranked = leaderboard.ranked
    objectives = list(experiment.sweep.get("objectives") or DEFAULT_OBJECTIVES)

    points = report_tables.trial_points(ranked)
    pareto = _section(
        "pareto",
        "Pareto front (validation)",
        [
            figures.embed(
                "pareto_front",
                plots.plot_pareto_front(points),
                "Val COVID recall at the target specificity against val macro AUC of every "
                "ranked trial",
                "Every ranked trial's val COVID recall at the target specificity (the "
                "threshold column's operating point) and val macro AUC at its chosen epoch, "
                "coloured by family. Circled: the Pareto-optimal trials (no other trial is at "
                "least as good on both and better on one), labelled with their rank.",
            )
        ],
    )

    searched = [*(experiment.sweep.get("families") or []), *(t.family for t in experiment.trials)]
    comparison = report_tables.family_comparison(ranked, list(dict.fromkeys(searched)))
    families = _section(
        "families",
        "Model families",
        [
            "<h3>Per family</h3>",
            "<p>Best and median over each family's ranked trials (val, chosen epoch). "
            "Stopped early: ended before max_epochs without error (ASHA). Hours: each trial's "
            "wall-clock time times the CPUs and GPUs its family reserved.</p>",
            _table(report_tables.family_summary(experiment.trials, ranked, experiment.sweep)),
            "<h3>Best of each family, side by side</h3>",
            _side_by_side(comparison, "family"),
            figures.embed(
                "family_comparison",
                plots.plot_family_comparison(comparison),
                "Best trial of each family: val and test metrics",
                "The best-ranked trial of each family: val and test COVID recall and macro AUC; "
                "test bars carry their 95% bootstrap interval.",
            ),
        ],
    )

    external = []
    if experiment.dataset.test_source:
        test_images = sum(experiment.dataset.split_counts.get("test", {}).values())
        external = [
            _section(
                "external-test",
                "Internal val vs external test",
                [
                    f"<p>Test is every image of source <b>"
                    f"{html.escape(experiment.dataset.test_source)}</b> ({test_images} images), "
                    "which no trial saw; val comes from the other sources. A gap is test minus "
                    "val: how much each family's best model loses at the unseen site. Test "
                    "numbers carry their 95% bootstrap interval.</p>",
                    _side_by_side(report_tables.external_test_gap(comparison), "family"),
                ],
            )
        ]

    strategies = report_tables.imbalance_comparison(ranked)
    imbalance = _section(
        "imbalance",
        "Class imbalance: none vs oversampling vs class weights",
        [
            "<p>Best and median over the ranked trials of each strategy, all families "
            "together.</p>",
            _side_by_side(strategies, "imbalance"),
            figures.embed(
                "imbalance",
                plots.plot_imbalance(points, strategies),
                "Val metrics of every trial by imbalance strategy",
                "Every ranked trial's val COVID recall at spec and macro AUC by imbalance "
                "strategy, "
                "coloured by family; the black bar is the strategy's median.",
            ),
        ],
    )

    averaged = report_tables.ensemble_comparison(experiment, leaderboard, top)
    ensemble = _section(
        "ensemble",
        f"Top-{top} ensemble",
        [
            "<p>The best trial beside the average of the top trials' probabilities, as "
            "<code>cxrtune export --ensemble</code> writes it; its threshold is chosen on the "
            "averaged val predictions, and test is used only to report.</p>",
            _side_by_side(averaged, "model"),
        ]
        if len(averaged)
        else [_note("An ensemble needs at least two ranked trials with saved predictions.")],
    )

    sections = [
        _summary_section(experiment, leaderboard, objectives),
        _leaderboard_section(leaderboard, top),
        _data_section(experiment.directory, report_tables.split_counts(experiment.dataset)),
        pareto,
        families,
        *external,
        imbalance,
        ensemble,
        _trial_sections(experiment, leaderboard, top, figures),
        _importance_section(experiment.directory, objectives, figures),
    ]
    page = _page(f"cxrtune report: {experiment.directory.name}", sections)
    path = directory / REPORT_FILE
    write_atomically(path, page)
    return path

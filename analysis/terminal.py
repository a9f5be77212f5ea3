"""The leaderboard in a terminal: the columns that decide, within 120 characters.

``compact_table`` computes the rows as plain strings; ``print_leaderboard`` draws them with
rich, Pareto-front rows highlighted where the terminal shows colour. ``--wide`` keeps the
full table of ``format_leaderboard``; ``leaderboard.csv`` and ``.md`` keep every column.
"""

from __future__ import annotations

import math
import shlex
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from cxrtune.analysis.leaderboard import Leaderboard, first_line
from cxrtune.analysis.ranking import DEFAULT_OBJECTIVES

__all__ = [
    "TERMINAL_WIDTH",
    "compact_table",
    "cxrtune_program",
    "next_commands",
    "print_leaderboard",
]

TERMINAL_WIDTH = 120
# Column -> heading; val objectives not named here are shown under their own key.
HEADINGS = {
    "rank": "rank",
    "trial_id": "trial",
    "family": "family",
    "imbalance": "imbalance",
    "val_covid_recall": "val recall",
    "val_covid_recall_at_spec": "val recall@spec",
    "val_macro_auc": "val AUC",
    "test_covid_recall_at_threshold": "test recall@op (95% CI)",
    "test_macro_auc": "test AUC (95% CI)",
}
TEST_COLUMNS = ("test_covid_recall_at_threshold", "test_macro_auc")


def compact_number(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def compact_interval(row: pd.Series, column: str) -> str:
    """``0.94 (0.83\N{EN DASH}1.00)`` as printed; the estimate alone without an interval."""
    point = compact_number(row[column])
    low, high = row.get(f"{column}_low", math.nan), row.get(f"{column}_high", math.nan)
    if math.isnan(low) or math.isnan(high):
        return point
    return f"{point} ({compact_number(low)}\N{EN DASH}{compact_number(high)})"


def compact_table(
    ranked: pd.DataFrame, objectives: Sequence[str] = DEFAULT_OBJECTIVES
) -> pd.DataFrame:
    """One row of display strings per trial, headed by the short column names."""
    columns = ["rank", "trial_id", "family", "imbalance", *objectives, *TEST_COLUMNS]
    rows = []
    for _, row in ranked.iterrows():
        shown = {
            "rank": str(row["rank"]),
            "trial_id": str(row["trial_id"]),
            "family": str(row["family"]),
            "imbalance": str(row.get("imbalance", "-")),
        }
        shown |= {name: compact_number(row[name]) for name in objectives}
        if not bool(row.get("test_evaluated", True)):
            shown |= {name: "not evaluated" for name in TEST_COLUMNS}
        else:
            shown |= {name: compact_interval(row, name) for name in TEST_COLUMNS}
        rows.append(shown)
    table = pd.DataFrame(rows, columns=columns)
    return table.rename(columns={name: HEADINGS.get(name, name) for name in columns})


def print_leaderboard(
    leaderboard: Leaderboard, *, top: int | None = None, console: Console | None = None
) -> None:
    """Print the header, the compact table and the failed trials, 120 characters wide at most."""
    console = console or Console(width=TERMINAL_WIDTH, highlight=False)
    if console.width > TERMINAL_WIDTH:
        console.width = TERMINAL_WIDTH
    for line in leaderboard.header.splitlines():
        console.print(textwrap.fill(line, console.width, subsequent_indent="  "), markup=False)
    console.print()
    ranked = leaderboard.ranked.head(top) if top else leaderboard.ranked
    if ranked.empty:
        console.print("(no trial reported a result)")
    else:
        table = Table(box=None, header_style="bold", pad_edge=False)
        shown = compact_table(ranked, leaderboard.objectives)
        for heading in shown.columns:
            table.add_column(heading, justify="left" if heading in ("trial", "family") else "right")
        on_front = ranked["pareto_front"].eq(1).tolist() if "pareto_front" in ranked else []
        for index, values in enumerate(shown.itertuples(index=False)):
            style = "green" if index < len(on_front) and on_front[index] else None
            table.add_row(*values, style=style)
        console.print(table)
        if "pareto_front" in ranked:
            console.print("Green rows are on the first Pareto front of the ranking objectives.")
    if len(leaderboard.failed):
        console.print(f"\n{len(leaderboard.failed)} trial(s) failed:")
        for row in leaderboard.failed.itertuples():
            message = f"{row.trial_id} {row.family}: {first_line(str(row.error))}"
            console.print("  " + textwrap.shorten(message, console.width - 2), markup=False)


def next_commands(experiment_dir: str, experiment_name: str, program: str = "cxrtune") -> list[str]:
    """What to run after the leaderboard, with the real experiment path, quoted for a shell.

    ``program``: how the user's shell calls cxrtune (``cxrtune_program``).
    """
    model = f"models/{experiment_name}-rank1"
    return [
        f"{program} report {shlex.quote(experiment_dir)}",
        f"{program} export {shlex.quote(experiment_dir)} --rank 1 --out {shlex.quote(model)}",
        f"{program} predict {shlex.quote(model)} YOUR_IMAGES/ --csv predictions.csv",
    ]


def cxrtune_program(called_as: str, on_path: str | None) -> str:
    """How to call cxrtune again from the shell that called it as ``called_as`` (``argv[0]``).

    The bare name when ``PATH`` finds that same executable (``on_path``, from
    ``shutil.which``); otherwise its path as it was called: ``make demo`` runs
    ``.venv/bin/cxrtune``, which a shell without the venv activated would not find.
    """
    called = Path(called_as)
    if called.name != "cxrtune" or (on_path and Path(on_path).resolve() == called.resolve()):
        return "cxrtune"
    return shlex.quote(called_as)

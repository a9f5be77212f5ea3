"""Drawing the report's tables with matplotlib: one function per figure.

Each function takes a frame built by ``cxrtune.analysis.report_tables`` and returns a
``Figure``; none computes a number the table does not already hold. ``png_bytes`` renders
a figure. Every figure gets its own Agg canvas instead of going through pyplot, so no window
backend is ever chosen, nothing piles up in pyplot's global state, and a user's own pyplot
backend is left alone.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cxrtune.spaces import FAMILIES

__all__ = [
    "family_color",
    "plot_confusion",
    "plot_family_comparison",
    "plot_imbalance",
    "plot_importance",
    "plot_learning_curves",
    "plot_pareto_front",
    "plot_roc",
    "plot_slices",
    "png_bytes",
]

DPI = 110
# One colour per family, the same in every figure (matplotlib's default cycle, in family order).
FAMILY_COLORS = dict(zip(FAMILIES, ("tab:blue", "tab:orange", "tab:green"), strict=True))
OTHER_COLOR = "tab:gray"


def family_color(family: str) -> str:
    return FAMILY_COLORS.get(family, OTHER_COLOR)


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()


def _empty(axes: Axes, message: str) -> None:
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes, color="0.4")
    axes.set_xticks([])
    axes.set_yticks([])


def plot_pareto_front(points: pd.DataFrame) -> Figure:
    """Val COVID recall at the target specificity against val macro AUC per trial, by family.

    The first front is outlined.
    """
    figure = _figure(6.4, 4.6)
    axes = figure.add_subplot()
    for family, group in points.groupby("family", sort=False):
        axes.scatter(
            group["val_covid_recall_at_spec"],
            group["val_macro_auc"],
            color=family_color(str(family)),
            label=str(family),
            s=36,
            alpha=0.8,
            zorder=2,
        )
    front = points[points["pareto_optimal"]].sort_values("val_covid_recall_at_spec")
    if len(front):
        axes.step(
            front["val_covid_recall_at_spec"],
            front["val_macro_auc"],
            where="post",
            color="0.2",
            linewidth=1,
            linestyle="--",
            zorder=1,
        )
        axes.scatter(
            front["val_covid_recall_at_spec"],
            front["val_macro_auc"],
            s=130,
            facecolors="none",
            edgecolors="black",
            linewidths=1.4,
            label="Pareto-optimal",
            zorder=3,
        )
        for row in front.itertuples():
            axes.annotate(
                f"#{row.rank}",
                (row.val_covid_recall_at_spec, row.val_macro_auc),
                xytext=(6, 6),
                textcoords="offset points",
                fontsize=8,
            )
    axes.set_xlabel("val COVID recall at the target specificity")
    axes.set_ylabel("val macro AUC")
    axes.set_xlim(-0.05, 1.05)
    axes.grid(alpha=0.3)
    if len(points):
        axes.legend(loc="lower left", fontsize=8)
    else:
        _empty(axes, "no ranked trial")
    axes.set_title("Trials on the two objectives (validation)")
    return figure


def plot_roc(roc: pd.DataFrame, title: str) -> Figure:
    """One ROC curve per class, its AUC in the legend, and the chance diagonal."""
    figure = _figure(4.6, 4.2)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
    for name, curve in roc.groupby("class", sort=False):
        axes.plot(
            curve["false_positive_rate"],
            curve["true_positive_rate"],
            drawstyle="steps-post",
            label=f"{name} (AUC {curve['auc'].iloc[0]:.3f})",
        )
    if len(roc):
        axes.legend(loc="lower right", fontsize=8)
    else:
        _empty(axes, "no class has both positives and negatives")
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_xlim(-0.02, 1.02)
    axes.set_ylim(-0.02, 1.02)
    axes.set_aspect("equal")
    axes.grid(alpha=0.3)
    axes.set_title(title, fontsize=10)
    return figure


def plot_confusion(confusion: pd.DataFrame, title: str) -> Figure:
    """The confusion matrix twice: counts, and each row divided by its class's images."""
    classes = list(dict.fromkeys(confusion["true_class"]))
    figure = _figure(8.6, 4.0)
    panels = figure.subplots(1, 2)
    for axes, value, label in (
        (panels[0], "count", "count"),
        (panels[1], "row_fraction", "fraction of the true class"),
    ):
        pivot = confusion.pivot(index="true_class", columns="predicted_class", values=value)
        matrix = pivot.reindex(index=classes, columns=classes).to_numpy(dtype=float)
        scale = 1.0 if value == "row_fraction" else max(float(matrix.max()), 1.0)
        axes.imshow(matrix, cmap="Blues", vmin=0, vmax=scale)
        for (row, column), cell in np.ndenumerate(matrix):
            text = f"{cell:.2f}" if value == "row_fraction" else f"{int(cell)}"
            color = "white" if cell > 0.6 * scale else "black"
            axes.text(column, row, text, ha="center", va="center", color=color, fontsize=9)
        axes.set_xticks(range(len(classes)), classes, rotation=30, ha="right", fontsize=8)
        axes.set_yticks(range(len(classes)), classes, fontsize=8)
        axes.set_xlabel("predicted")
        axes.set_ylabel("true")
        axes.set_title(label, fontsize=9)
    figure.suptitle(title, fontsize=10)
    return figure


def plot_learning_curves(curves: pd.DataFrame, title: str) -> Figure:
    """Losses and val metrics per epoch; the chosen epoch and an ASHA stop marked."""
    figure = _figure(8.6, 3.6)
    panels = figure.subplots(1, 2)
    series = (
        (panels[0], ("train_loss", "val_loss"), "loss"),
        (panels[1], ("val_covid_recall", "val_macro_auc"), "val metric"),
    )
    for axes, metrics, label in series:
        drawn = [metric for metric in metrics if curves[metric].notna().any()]
        if not drawn:
            _empty(axes, f"no {label} reported")
            continue
        for metric in drawn:
            axes.plot(curves["epoch"], curves[metric], marker="o", markersize=3, label=metric)
        for epoch in curves.loc[curves["best_epoch"], "epoch"]:
            axes.axvline(
                epoch, color="tab:green", linestyle="--", linewidth=1, label="chosen epoch"
            )
        for epoch in curves.loc[curves["stopped_early"], "epoch"]:
            # The epochs the trial never ran, up to max_epochs, greyed out.
            axes.axvspan(
                epoch,
                curves["max_epochs"].max(),
                color="tab:red",
                alpha=0.08,
                label=f"not run: stopped by ASHA (max_epochs {curves['max_epochs'].max()})",
            )
            axes.set_xlim(right=curves["max_epochs"].max() + 0.2)
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    panels[1].set_ylim(-0.05, 1.05)
    figure.suptitle(title, fontsize=10)
    return figure


BAR_METRICS = (
    ("val_covid_recall_at_spec", "val COVID recall at spec"),
    ("test_covid_recall", "test COVID recall"),
    ("val_macro_auc", "val macro AUC"),
    ("test_macro_auc", "test macro AUC"),
)


def plot_family_comparison(comparison: pd.DataFrame) -> Figure:
    """Each family's best trial: val and test numbers as bars, test with its 95% interval."""
    figure = _figure(7.4, 3.8)
    axes = figure.add_subplot()
    width = 0.8 / max(len(comparison), 1)
    positions = np.arange(len(BAR_METRICS))
    for index, row in enumerate(comparison.itertuples(index=False)):
        heights, errors = [], []
        for metric, _ in BAR_METRICS:
            value = float(getattr(row, metric))
            heights.append(0.0 if math.isnan(value) else value)
            low = float(getattr(row, f"{metric}_low", math.nan))
            high = float(getattr(row, f"{metric}_high", math.nan))
            errors.append(
                (0.0, 0.0) if math.isnan(low) or math.isnan(high) else (value - low, high - value)
            )
        trial = row.trial_id if isinstance(row.trial_id, str) else "no trial"
        axes.bar(
            positions + (index - (len(comparison) - 1) / 2) * width,
            heights,
            width,
            yerr=np.array(errors).T,
            capsize=3,
            color=family_color(str(row.family)),
            label=f"{row.family} ({trial})",
        )
    axes.set_xticks(positions, [name for _, name in BAR_METRICS], fontsize=9)
    axes.set_ylim(0, 1.05)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    axes.set_title("Best trial of each family (bars: test 95% interval)", fontsize=10)
    return figure


def plot_imbalance(points: pd.DataFrame, comparison: pd.DataFrame) -> Figure:
    """Every trial's val objectives by imbalance strategy, by family; the median as a bar."""
    strategies = list(comparison["imbalance"])
    figure = _figure(8.6, 3.6)
    panels = figure.subplots(1, 2)
    for axes, metric, label in (
        (panels[0], "val_covid_recall_at_spec", "val COVID recall at spec"),
        (panels[1], "val_macro_auc", "val macro AUC"),
    ):
        for position, strategy in enumerate(strategies):
            group = points[points["imbalance"] == strategy]
            # Spread the trials of one strategy sideways so equal scores stay visible.
            offsets = np.linspace(-0.25, 0.25, len(group)) if len(group) > 1 else np.zeros(1)
            axes.scatter(
                position + offsets[: len(group)],
                group[metric],
                color=[family_color(str(family)) for family in group["family"]],
                s=28,
                alpha=0.8,
                zorder=2,
            )
            median = comparison.loc[comparison["imbalance"] == strategy, f"median_{metric}"]
            if len(median) and not math.isnan(float(median.iloc[0])):
                axes.hlines(
                    float(median.iloc[0]), position - 0.35, position + 0.35, color="black", zorder=3
                )
        axes.set_xticks(range(len(strategies)), strategies)
        axes.set_xlim(-0.6, len(strategies) - 0.4)
        axes.set_ylim(-0.05, 1.05)
        axes.set_ylabel(label)
        axes.grid(axis="y", alpha=0.3)
    handles = [
        panels[1].scatter([], [], color=family_color(family), label=family)
        for family in dict.fromkeys(points["family"])
    ]
    panels[1].legend(handles=handles, fontsize=8, loc="lower right")
    figure.suptitle("Trials by imbalance strategy (black bar: median)", fontsize=10)
    return figure


def plot_importance(importance: pd.DataFrame) -> Figure:
    """Horizontal importance bars, one panel per scope, one bar colour per objective."""
    scopes = list(dict.fromkeys(importance["scope"]))
    objectives = list(dict.fromkeys(importance["objective"]))
    columns = min(max(len(scopes), 1), 2)
    rows = math.ceil(max(len(scopes), 1) / columns)
    figure = _figure(4.6 * columns, 3.0 * rows)
    panels = list(figure.subplots(rows, columns, squeeze=False).ravel())
    for unused in panels[len(scopes) :][int(not scopes) :]:
        unused.set_visible(False)
    if not scopes:
        _empty(panels[0], "no importance could be computed")
        return figure
    height = 0.8 / len(objectives)
    for axes, scope in zip(panels, scopes, strict=False):
        table = importance[importance["scope"] == scope]
        parameters = list(dict.fromkeys(table["parameter"]))
        for index, objective in enumerate(objectives):
            values = (
                table[table["objective"] == objective]
                .set_index("parameter")["importance"]
                .reindex(parameters)
            )
            axes.barh(
                np.arange(len(parameters)) + (index - (len(objectives) - 1) / 2) * height,
                values.fillna(0.0),
                height,
                label=objective,
                color=f"C{index + 3}",
            )
        axes.set_yticks(range(len(parameters)), parameters, fontsize=8)
        axes.invert_yaxis()
        axes.set_xlim(0, 1)
        axes.set_xlabel("importance (fANOVA)")
        axes.set_title(scope, fontsize=9)
        axes.grid(axis="x", alpha=0.3)
    panels[0].legend(fontsize=8, loc="lower right")
    return figure


def plot_slices(slices: pd.DataFrame, objectives: Sequence[str]) -> Figure:
    """Objective values against each sampled parameter (one column per parameter), by family."""
    parameters = list(dict.fromkeys(slices["parameter"]))
    columns = max(len(parameters), 1)
    figure = _figure(max(2.3 * columns, 4.0), 2.2 * len(objectives) + 0.4)
    panels = figure.subplots(len(objectives), columns, squeeze=False)
    if not parameters:
        _empty(panels[0][0], "no sampled parameter")
        return figure
    for column, parameter in enumerate(parameters):
        table = slices[slices["parameter"] == parameter]
        categorical = bool(table["position"].notna().all())
        if categorical:
            ticks = table.drop_duplicates("position").sort_values("position")
            x = table["position"].astype(float)
        else:
            x = table["value"].astype(float)
        for row, objective in enumerate(objectives):
            axes = panels[row][column]
            axes.scatter(
                x,
                table[objective],
                color=[family_color(str(family)) for family in table["family"]],
                s=18,
                alpha=0.8,
            )
            if categorical:
                axes.set_xticks(ticks["position"], [str(v) for v in ticks["value"]], fontsize=7)
                axes.set_xlim(ticks["position"].min() - 0.5, ticks["position"].max() + 0.5)
            elif bool(table["log_scale"].any()):
                axes.set_xscale("log")
            axes.tick_params(labelsize=7)
            axes.grid(alpha=0.3)
            if row == len(objectives) - 1:
                axes.set_xlabel(parameter, fontsize=8)
            if column == 0:
                axes.set_ylabel(objective, fontsize=8)
    handles = [
        panels[0][0].scatter([], [], color=family_color(str(family)), label=str(family))
        for family in dict.fromkeys(slices["family"])
    ]
    figure.legend(handles=handles, loc="outside upper center", ncols=len(handles), fontsize=8)
    return figure

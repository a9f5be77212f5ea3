"""The shortcut check: can a model tell an image's source from its pixels, and does the
source give away the label?

When both hold, a classifier can score well by recognising the hospital (its scanner,
burned-in markers, borders, processing) instead of the disease; merged COVID-19 collections
are known for this. The probe is deliberately cheap: images downsampled to 16 x 16, a
scikit-learn logistic regression, stratified cross-validation, balanced accuracy against
chance; and Cramer's V between source and label.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["ShortcutCheck", "check_shortcut"]

PROBE_SIZE = 16  # pixels per side the probe sees
MIN_IMAGES_PER_SOURCE = 5  # sources with fewer images are left out of the probe
MAX_FOLDS = 5
MAX_PROBE_IMAGES = 1500  # a stratified sample beyond this keeps the probe to seconds
# "Well above chance": this share of the way from chance to perfect (0.8 for two sources).
PREDICTABLE_SHARE = 0.6
# Cramer's V of 0.3 and above is conventionally a moderate-to-strong association.
STRONG_ASSOCIATION = 0.3


@dataclass(frozen=True)
class ShortcutCheck:
    """What the probe found; ``warns`` when the source is predictable and tied to the label."""

    sources: dict[str, int]  # the sources probed, with their images
    balanced_accuracy: float  # cross-validated, source from pixels
    chance: float  # balanced accuracy of guessing: 1 / number of sources
    cramers_v: float  # source-label association, 0 (none) to 1 (source decides label)
    warns: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line of figures."""
        return (
            f"source predicted from 16x16 pixels with balanced accuracy "
            f"{self.balanced_accuracy:.2f} (chance {self.chance:.2f}); "
            f"source-label association Cramer's V {self.cramers_v:.2f}"
        )

    def warning(self) -> str:
        """The plain-words warning, naming the sources and what to do; "" when none."""
        if not self.warns:
            return ""
        names = ", ".join(self.sources)
        return (
            f"SHORTCUT RISK: the source ({names}) can be told from the image alone, and the "
            "sources hold different mixes of classes, so a model can score well by "
            "recognising the source instead of the disease. Test on a held-out source "
            "(test_source: NAME, or --test-source NAME) or train on a subset balanced so "
            "each source holds the same class mix."
        )


def check_shortcut(
    images: np.ndarray, labels: np.ndarray, sources: Sequence[str], *, seed: int = 0
) -> ShortcutCheck | None:
    """Probe ``images`` (``N x 1 x H x W`` uint8) for a source shortcut.

    Images without a source, and sources with fewer than ``MIN_IMAGES_PER_SOURCE``
    images, are left out; None when fewer than two sources remain.
    """
    # Imported here: the ingest report renders a ShortcutCheck without these.
    import pandas as pd
    from scipy.stats.contingency import association
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    counts = Counter(source for source in sources if source)
    kept_sources = sorted(name for name, count in counts.items() if count >= MIN_IMAGES_PER_SOURCE)
    if len(kept_sources) < 2:
        return None
    source_array = np.array(sources)
    keep = np.flatnonzero(np.isin(source_array, kept_sources))
    keep = _stratified_sample(keep, source_array[keep], MAX_PROBE_IMAGES, seed)
    targets = source_array[keep]
    features = _downsample(images[keep])
    folds = min(MAX_FOLDS, min(Counter(targets).values()))
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    # One BLAS thread: on a problem this small, more threads spend their time waiting for
    # each other (ten times slower on a busy two-core machine).
    with threadpool_limits(limits=1):
        scores = cross_val_score(
            probe,
            features,
            targets,
            cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed),
            scoring="balanced_accuracy",
        )
    balanced_accuracy = float(np.mean(scores))
    chance = 1.0 / len(kept_sources)
    table = pd.crosstab(targets, labels[keep]).to_numpy()
    cramers_v = float(association(table, method="cramer")) if table.shape[1] > 1 else 0.0
    predictable = balanced_accuracy >= chance + PREDICTABLE_SHARE * (1.0 - chance)
    return ShortcutCheck(
        sources={str(name): counts[name] for name in kept_sources},
        balanced_accuracy=balanced_accuracy,
        chance=chance,
        cramers_v=cramers_v,
        warns=bool(predictable and cramers_v >= STRONG_ASSOCIATION),
    )


def _downsample(images: np.ndarray) -> np.ndarray:
    """Area-average (PIL's box filter) to ``PROBE_SIZE`` square, one row of floats per image."""
    from PIL import Image

    size = (PROBE_SIZE, PROBE_SIZE)
    return np.stack(
        [
            np.asarray(Image.fromarray(image[0]).resize(size, Image.Resampling.BOX)).ravel()
            for image in images
        ]
    ).astype(np.float32)


def _stratified_sample(
    indices: np.ndarray, strata: np.ndarray, limit: int, seed: int
) -> np.ndarray:
    """At most ``limit`` of ``indices``, each stratum keeping its share (and at least one)."""
    if len(indices) <= limit:
        return indices
    rng = np.random.default_rng(seed)
    chosen = []
    for stratum in np.unique(strata):
        members = indices[strata == stratum]
        take = max(MIN_IMAGES_PER_SOURCE, round(limit * len(members) / len(indices)))
        chosen.append(rng.choice(members, size=min(take, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))

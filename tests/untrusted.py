"""Pickles that create a marker file when unpickled, planted where Ray keeps its pickles."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

# A pickle in hex, as Ray's experiment_state-*.json holds each trial's cloudpickled state.
HEX_PICKLE = re.compile(r"\b800[2-5][0-9a-f]{20,}\b")


class LeavesMarker:
    """Unpickling this opens, and so creates, the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


def marker_pickle(marker: Path) -> bytes:
    return pickle.dumps(LeavesMarker(marker))


def plant_pickles(experiment: Path, marker: Path) -> None:
    """Make every pickle Ray keeps in ``experiment`` one that creates ``marker``.

    Ray's pickles: ``tuner.pkl``, ``searcher-state-*.pkl``, each trial's
    ``params.pkl``, and the trial states in ``experiment_state-*.json``. Those a
    dir lacks are written, so a dir built without Ray has them all too.
    """
    payload = marker_pickle(marker)
    searcher_states = list(experiment.glob("searcher-state-*.pkl"))
    searcher_states = searcher_states or [experiment / "searcher-state-2026-01-01_00-00-00.pkl"]
    trial_params = [params.with_name("params.pkl") for params in experiment.glob("*/params.json")]
    for path in [experiment / "tuner.pkl", *searcher_states, *trial_params]:
        path.write_bytes(payload)
    experiment_states = list(experiment.glob("experiment_state-*.json"))
    for state in experiment_states:
        text, replaced = HEX_PICKLE.subn(payload.hex(), state.read_text())
        if not replaced:
            raise ValueError(f"{state} holds no pickle in hex: has Ray changed its format?")
        state.write_text(text)
    if not experiment_states:
        trial = {"storage": {"_type": "CLOUDPICKLE_FALLBACK", "value": payload.hex()}}
        state = {"trial_data": [[json.dumps(trial), "{}"]]}
        (experiment / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(state))

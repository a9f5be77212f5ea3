"""The README's sweep through the command line's own ``main``, its phases timed.

``python -m benchmarks._quickstart_child TIMINGS.json CXRTUNE_ARGUMENTS...`` runs
``cxrtune CXRTUNE_ARGUMENTS...`` in this process and writes the seconds spent in
``prepare_data`` (ingest, with synthetic generation when not cached),
``start_ray``, ``Tuner.fit`` (the trials) and everything after ``run_sweep``
returns (the leaderboard: test evaluation, ranking, printing). Nothing in the
project is changed: the functions are wrapped, in this process, by name.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cxrtune.search.ray_environment import use_loopback_ray


def main(argv: Sequence[str]) -> int:
    timings_path, *cli_arguments = argv
    use_loopback_ray()  # as the command line does, before the imports below bring Ray in
    import cxrtune.search.cli as cli
    import cxrtune.search.sweep as sweep
    import cxrtune.search.tuner as tuner

    seconds: dict[str, float] = {}
    marks: dict[str, float] = {}

    def timed(function: Callable[..., Any], phase: str) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - started
                marks[f"{phase}_end"] = time.perf_counter()

        return wrapper

    build_tuner = tuner.build_tuner

    def build_timed_tuner(*args: Any, **kwargs: Any) -> Any:
        built = build_tuner(*args, **kwargs)
        built.fit = timed(built.fit, "trials")
        return built

    sweep.prepare_data = timed(sweep.prepare_data, "ingest")
    sweep.start_ray = timed(sweep.start_ray, "ray_start")
    sweep.run_sweep = timed(sweep.run_sweep, "run_sweep")
    tuner.build_tuner = build_timed_tuner
    exit_code = cli.main(cli_arguments)
    seconds["analysis"] = time.perf_counter() - marks["run_sweep_end"]
    Path(timings_path).write_text(json.dumps({"seconds": seconds, "exit_code": exit_code}))
    return exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The curve recorder: what it draws, in what order, and how it resumes (issue item 3)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.record_curves import (
    MAX_EPOCHS,
    append_rows,
    draw_configs,
    recorded_runs,
    runs,
)


def test_configs_are_drawn_from_the_quick_space_the_same_way_every_time() -> None:
    first, again = draw_configs(30), draw_configs(30)
    assert first == again
    assert {config["family"] for config in first} == {"baseline_cnn", "regularized_cnn", "vgg16"}
    assert all(config["max_epochs"] == MAX_EPOCHS for config in first)


def test_repeated_configs_get_their_extra_seeds_right_after_them() -> None:
    assert list(runs([{}, {}, {}], repeats=1)) == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0)]


def test_only_runs_with_every_epoch_in_the_table_count_as_recorded(tmp_path: Path) -> None:
    table = tmp_path / "curves.csv.gz"
    assert recorded_runs(table) == set()
    full = [{"config_id": 0, "seed": 0, "epoch": e, "val_macro_auc": 0.5} for e in range(1, 7)]
    append_rows(table, full[:MAX_EPOCHS])
    append_rows(table, [{"config_id": 1, "seed": 0, "epoch": 1, "val_macro_auc": 0.5}])
    assert recorded_runs(table) == {(0, 0)}

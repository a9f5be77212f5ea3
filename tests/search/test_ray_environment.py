"""A local Ray stays on loopback: its switch is set before Ray is imported, or nothing starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter whose environment lacks the switch (as a shell's does)."""
    environment = dict(os.environ)
    environment.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment
    )


def test_starting_a_local_ray_imported_before_the_loopback_switch_is_refused() -> None:
    early = run_python("import ray\nfrom cxrtune.search.sweep import start_ray\nstart_ray(None)\n")
    assert early.returncode == 1
    assert "imported before use_loopback_ray() ran" in early.stderr
    assert "Started a local Ray instance" not in early.stderr


def test_the_loopback_check_passes_when_the_switch_came_first() -> None:
    in_order = run_python(
        "from cxrtune.search.ray_environment import check_loopback_ray, use_loopback_ray\n"
        "use_loopback_ray()\n"
        "import ray\n"
        "check_loopback_ray()\n"
        "print('ok')\n"
    )
    assert in_order.returncode == 0, in_order.stderr
    assert in_order.stdout.split() == ["ok"]


@pytest.mark.parametrize("module", ["benchmarks.run", "cxrtune.search.cli"])
def test_the_entry_points_import_no_ray_before_setting_the_switch(module: str) -> None:
    imported = run_python(f"import sys, {module}\nprint('ray' in sys.modules)")
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.split() == ["False"]

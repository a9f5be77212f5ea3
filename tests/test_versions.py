"""Version floors that hold (item 11): the floors are the versions the suite runs on."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import tomllib
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
# The packages whose floors docs/development.md names, as "<name> <major.minor>".
DOCUMENTED = {"ray": "Ray", "torch": "torch", "optuna": "Optuna", "scikit-learn": "scikit-learn"}


def floors() -> dict[str, Version]:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    found = {}
    for requirement in dependencies:
        match = re.match(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?>=([0-9.]+)", requirement)
        if match:
            found[match.group(1).lower()] = Version(match.group(2))
    return found


def test_every_installed_dependency_meets_its_floor_item_11() -> None:
    below = {
        name: (version(name), str(floor))
        for name, floor in floors().items()
        if Version(version(name)) < floor
    }
    assert not below, f"installed below the floor: {below}"


def test_the_documented_supported_versions_are_the_floors_item_11() -> None:
    text = (REPO / "docs" / "development.md").read_text()
    found = floors()
    assert found["ray"] >= Version("2.60"), "Ray before 2.60 lacks APIs cxrtune uses"
    for package, shown in DOCUMENTED.items():
        floor = found[package]
        assert f"{shown} {floor.major}.{floor.minor}" in text, (package, str(floor))

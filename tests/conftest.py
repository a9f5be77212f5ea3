"""Shared fixtures: tiny image folders built inline, an isolated cache dir."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrtune.search.ray_environment import use_loopback_ray
from tests.s3 import S3Server, s3_server

# Every Ray instance the tests start listens on 127.0.0.1 only.
use_loopback_ray()


@pytest.fixture(autouse=True)
def isolated_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Every test gets its own dataset cache, never the user's."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("CXRTUNE_CACHE_DIR", str(cache))
    return cache


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


@pytest.fixture
def make_image_folder(tmp_path: Path) -> Callable[..., Path]:
    """Build ``root/<class>/<i>.png`` with distinct random grayscale images."""

    def make(
        classes: dict[str, int], *, size: int = 24, seed: int = 0, root: Path | None = None
    ) -> Path:
        root = root or tmp_path / "data"
        rng = np.random.default_rng(seed)
        for class_name, count in classes.items():
            for index in range(count):
                pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
                write_png(root / class_name / f"{index:03d}.png", pixels)
        return root

    return make


@pytest.fixture(scope="session")
def s3_server_on_loopback() -> Iterator[S3Server]:
    """One S3-compatible server (moto) on 127.0.0.1 for the whole run."""
    with s3_server() as server:
        yield server


@pytest.fixture
def s3_environment(
    s3_server_on_loopback: S3Server,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> S3Server:
    """This test's environment, and the processes it starts, reach the loopback server."""
    scratch = tmp_path_factory.mktemp("aws")
    for name, value in s3_server_on_loopback.environment(scratch).items():
        monkeypatch.setenv(name, value)
    return s3_server_on_loopback


@pytest.fixture
def s3_bucket(s3_environment: S3Server) -> str:
    """A bucket no other test uses, as ``s3://name``."""
    return s3_environment.new_bucket()

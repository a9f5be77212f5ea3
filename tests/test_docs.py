"""The README and docs/: every link lands, every sweep-file key is documented."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from cxrtune.search.config import SweepConfig

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
README_LIMIT = 8000  # characters: a guide, not the reference


def anchor(heading: str) -> str:
    """The anchor a Markdown renderer gives a heading: lower case, punctuation dropped."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(page: Path) -> set[str]:
    in_code = False
    found = set()
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            found.add(anchor(line.lstrip("#")))
    return found


def local_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return [target for target in LINK.findall(text) if "://" not in target]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(REPO).as_posix())
def test_every_link_points_to_an_existing_file_and_heading(page: Path) -> None:
    broken = []
    for target in local_links(page):
        path, _, fragment = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(f"{target}: no file {destination}")
        elif fragment and fragment not in anchors_of(destination):
            broken.append(f"{target}: no heading #{fragment} in {destination.name}")
    assert not broken, f"{page.name}: {broken}"


def test_the_link_check_sees_a_broken_link_and_a_missing_heading(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) [no heading](page.md#nowhere)\n")
    assert local_links(page) == ["#title", "missing.md", "page.md#nowhere"]
    assert anchors_of(page) == {"title"}
    assert anchor("Cluster and storage: S3, NFS") == "cluster-and-storage-s3-nfs"


def test_every_sweep_file_key_is_documented() -> None:
    documented = " ".join(page.read_text() for page in (REPO / "docs").glob("*.md"))
    missing = [
        field.name
        for field in dataclasses.fields(SweepConfig)
        if f"`{field.name}`" not in documented
    ]
    assert not missing, f"sweep-file keys not documented in docs/: {missing}"


def test_the_readme_is_a_guide_not_the_reference() -> None:
    assert len((REPO / "README.md").read_text()) < README_LIMIT

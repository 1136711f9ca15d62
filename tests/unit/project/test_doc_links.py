"""README.md and docs/ link only to files inside the repository, and to files that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def local_links(document: Path) -> list[str]:
    """Relative link targets of a Markdown file (no URLs, no in-page anchors)."""
    targets = [m.group(1).split("#", 1)[0] for m in LINK.finditer(document.read_text())]
    return [t for t in targets if t and "://" not in t and not t.startswith("mailto:")]


def test_the_documents_exist_and_link_somewhere() -> None:
    assert (ROOT / "docs" / "protocol.md") in DOCUMENTS
    assert "docs/protocol.md" in local_links(ROOT / "README.md")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_link_stays_inside_the_repository(document: Path) -> None:
    for target in local_links(document):
        resolved = (document.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{document.name} links outside: {target}"
        assert resolved.exists(), f"{document.name} links a missing file: {target}"

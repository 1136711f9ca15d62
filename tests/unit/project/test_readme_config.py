"""Every FANOUT_* variable the code reads is in the README's configuration table."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
VARIABLE = re.compile(r"FANOUT_[A-Z0-9_]*[A-Z0-9]")


def _configuration_table() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Configuration\n")
    return readme[start : readme.index("\n## ", start + 1)]


def test_every_variable_of_the_code_is_in_the_configuration_table() -> None:
    read = set()
    for package in ("common", "node", "worker"):
        for path in (ROOT / package).rglob("*.py"):
            read |= set(VARIABLE.findall(path.read_text()))
    documented = set(VARIABLE.findall(_configuration_table()))
    assert read - documented == set(), "add these to README ## Configuration"

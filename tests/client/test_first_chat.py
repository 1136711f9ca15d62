"""README "First chat": the Python example is the file it names, and it chats as shown."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

from tests.support.harness import ROOT, Cluster, token

EXAMPLE = ROOT / "examples" / "first_chat.py"


def test_the_readme_shows_the_example_file() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## First chat", 1)[1].split("\n## ", 1)[0]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert block == EXAMPLE.read_text()


async def test_the_python_example_gets_the_assistants_reply(
    cluster: Cluster, env: dict[str, str]
) -> None:
    node1, node2 = await asyncio.gather(cluster.node(), cluster.node())
    await cluster.worker()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        token("ada"),
        node1.ws_url,
        node2.ws_url,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0] == "user: hello", lines
    assert any(line.startswith("assistant: ") for line in lines), lines

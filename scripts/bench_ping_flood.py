"""Does a node under a WebSocket PING flood keep serving others? Two source trees side by side.

    git archive <commit before the change> | tar -x -C /tmp/fanout-old
    .venv/bin/python scripts/bench_ping_flood.py old=/tmp/fanout-old new=. --runs 3

Each run starts one fresh node from a tree (`python -m common.cli node`, the tree as
working directory, this venv's packages). For `--seconds`, a separate process runs
`--flooders` raw-socket clients, each a user of its own, that write PING frames
(125-byte payload) as fast as the node takes them and never read; a flooder the node
ends reconnects and goes on. Meanwhile an observer client on the same node sends the
protocol's `ping` 15 times a second (under FANOUT_RATE) and times each `pong`.
Reported per run and as medians over the runs: the observer's round trip p50/p99/max
and the node's RSS growth over the flood (peak VmRSS from /proc minus the baseline).
Trees alternate run by run, so a noisy neighbour hits both. Uses Redis and Postgres at
the default addresses, in a namespace and database of its own, removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_cluster import free_port, spawn  # noqa: E402
from bench_trees import alternate, parse_trees, scratch_database, scratch_env  # noqa: E402

from common.auth import mint_token  # noqa: E402
from common.wsframe import OP_PING, frame_header, mask  # noqa: E402

PING_EVERY = 1 / 15
PAYLOAD = b"x" * 125
BATCH = 256  # frames per write


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# -- the flood (its own process, so its writing does not slow the observer's loop) ---------
def _flood_process(port: int, secret: str, flooders: int, seconds: float, out: Any) -> None:
    out.send(asyncio.run(_flood(port, secret, flooders, seconds)))


async def _flood(port: int, secret: str, flooders: int, seconds: float) -> dict[str, int]:
    key = os.urandom(4)
    batch = (frame_header(OP_PING, len(PAYLOAD), masked=True) + key + mask(key, PAYLOAD)) * BATCH
    totals = {"bytes": 0, "connections": 0}
    deadline = time.monotonic() + seconds

    async def flooder(n: int) -> None:
        while time.monotonic() < deadline:
            writer = None
            try:
                async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    request = (
                        f"GET /ws?device_id=f HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
                        "Sec-WebSocket-Version: 13\r\n"
                        f"Authorization: Bearer {mint_token(secret, f'flooder{n}')}\r\n\r\n"
                    )
                    writer.write(request.encode())
                    head = await reader.readuntil(b"\r\n\r\n")
                    if b" 101 " not in head.split(b"\r\n", 1)[0]:
                        await asyncio.sleep(0.1)  # refused (e.g. still released): retry
                        continue
                    totals["connections"] += 1
                    while True:  # never reads
                        writer.write(batch)
                        await writer.drain()
                        totals["bytes"] += len(batch)
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                pass
            finally:
                if writer is not None:
                    writer.transport.abort()

    await asyncio.gather(*(flooder(n) for n in range(flooders)))
    return totals


# -- one run ----------------------------------------------------------------------------
async def _observe(port: int, secret: str, seconds: float, pid: int) -> dict[str, Any]:
    rtts: list[float] = []
    peak = 0
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(
            f"ws://127.0.0.1:{port}/ws",
            params={"device_id": "o"},
            headers={"Authorization": f"Bearer {mint_token(secret, 'observer')}"},
        )
        await ws.receive_json(timeout=10)  # welcome
        baseline = rss(pid)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            await ws.send_str('{"type":"ping"}')
            while (await ws.receive_json(timeout=30)).get("type") != "pong":
                pass
            rtts.append(time.perf_counter() - started)
            peak = max(peak, rss(pid))
            await asyncio.sleep(max(0.0, started + PING_EVERY - time.perf_counter()))
        await ws.close()
    rtts.sort()
    return {
        "samples": len(rtts),
        "p50_ms": 1000 * rtts[len(rtts) // 2],
        "p99_ms": 1000 * rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))],
        "max_ms": 1000 * rtts[-1],
        "rss_growth_mib": (peak - baseline) / 2**20,
    }


def run_once(tree: str, env: dict[str, str], args: argparse.Namespace, tag: str) -> dict[str, Any]:
    port = free_port()
    log_path = Path(args.logs) / f"{tag}.log"
    command = ["-m", "common.cli", "node", "--port", str(port)]
    node = spawn(command, {**env, "FANOUT_NODE_ID": tag}, log_path, cwd=tree)
    try:
        _wait_ready(node, port, log_path)
        time.sleep(1.0)  # the start-up settles before the RSS baseline is read
        receive, send = multiprocessing.Pipe(duplex=False)
        flood = multiprocessing.get_context("spawn").Process(
            target=_flood_process,
            args=(port, env["FANOUT_JWT_SECRET"], args.flooders, args.seconds, send),
        )
        flood.start()
        try:
            report = asyncio.run(_observe(port, env["FANOUT_JWT_SECRET"], args.seconds, node.pid))
            flood.join(args.seconds + 30)
            report.update(receive.recv() if receive.poll(5) else {})
        finally:
            if flood.is_alive():
                flood.kill()
                flood.join()
        return report
    finally:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()


def _wait_ready(node: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise RuntimeError(f"the node exited; see {log_path}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
                if b" 200 " in s.recv(100):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the node did not get ready; see {log_path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trees", nargs="+", help="NAME=PATH of a source tree")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--flooders", type=int, default=10)
    parser.add_argument("--logs", default=str(ROOT / ".fanout-data" / "bench-ping-flood"))
    args = parser.parse_args()
    trees = parse_trees(args.trees)
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    run_id = secrets.token_hex(4)
    env = scratch_env("pf", run_id, drain_timeout=3, unbuffered=False)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in trees}
    with scratch_database(env):
        for run, name, tree in alternate(trees, args.runs, env):
            got = run_once(tree, env, args, f"{name}{run}-{run_id}")
            results[name].append(got)
            print(
                f"run {run} {name}: observer ping->pong p50 {got['p50_ms']:.1f} ms, "
                f"p99 {got['p99_ms']:.1f} ms, max {got['max_ms']:.1f} ms "
                f"({got['samples']} samples); node RSS +{got['rss_growth_mib']:.1f} MiB; "
                f"flooders wrote {got.get('bytes', 0) / 2**20:.0f} MiB (kernel buffers "
                f"included) over {got.get('connections', 0)} connections",
                flush=True,
            )
    print(f"medians of {args.runs} runs, {args.flooders} flooders, {args.seconds:g} s each:")
    for name, _ in trees:
        runs = results[name]

        def median(field: str, runs: list[dict[str, Any]] = runs) -> float:
            return statistics.median(float(r.get(field, 0)) for r in runs)

        print(
            f"  {name}: p99 {median('p99_ms'):.1f} ms, p50 {median('p50_ms'):.1f} ms, "
            f"max {median('max_ms'):.1f} ms, samples {median('samples'):.0f}, "
            f"RSS +{median('rss_growth_mib'):.1f} MiB, "
            f"flooders wrote {median('bytes') / 2**20:.0f} MiB"
        )


if __name__ == "__main__":
    main()

"""Chat latency with the `openai` reply generator against a local fake vs the built-in echo.

    .venv/bin/python scripts/bench_assistant.py               # 3 runs of each, ~2 minutes
    .venv/bin/python scripts/bench_assistant.py --rate 500 --duration 8

Issue 17, target 6: with the OpenAI-compatible generator against a local server that
answers at once, chat latency within 10% of echo. Each run starts a cluster (2 nodes,
2 workers) with FANOUT_ASSISTANT=echo or =openai, and drives it with `fanout loadtest
--mode chat` at a fixed rate; the variants alternate run by run (so the machine's
noise hits both alike) and the medians of each are printed side by side, with the
ratio openai/echo. The fake (tests/support/fake_openai.py) runs in a thread of this process
and answers exactly what echo answers ("You said: <content>", three words a chunk),
so the two differ only in the generator: the HTTP request, the SSE parsing and the
history query. `--webhooks` adds openai with webhooks on (a local receiver that
answers 204 at once), the whole of target 6, and echo with webhooks on (what the
webhooks alone cost). With `--against DIR` (another revision's
tree) a variant runs that tree's workers with echo: what this tree's reply path costs
echo itself; with `--webhooks` too, another runs that tree's workers with openai and
webhooks on (openai+hooks@tree: a change to that path against the tree before it, same
command). `--variants a,b` runs only those, echo first; any variant with `@tree` after
its name runs it on the other tree's workers. `--json PATH` writes every run's load test
report there too, by variant (scripts/bench.py reads them for target 6).
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_chat import (  # noqa: E402
    COUNT_ROWS,
    LATENCY_ROWS,
    add_chat_arguments,
    chat_scenario,
    chat_services,
    chat_summary,
    in_thread,
    measure_chat,
    print_chat_heading,
    print_chat_table,
)
from bench_cluster import running  # noqa: E402
from bench_plan import Spec  # noqa: E402

from tests.support.fake_openai import FakeOpenAI  # noqa: E402


@asynccontextmanager
async def fake_model() -> AsyncIterator[tuple[str, str]]:
    """The fake model server and a webhook receiver that answers 204 at once; their URLs."""

    async def receive(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    receiver = web.AppRunner(app, access_log=None)
    await receiver.setup()
    site = web.TCPSite(receiver, "127.0.0.1", 0)
    await site.start()
    try:
        async with FakeOpenAI(prefix="You said: ", words_per_chunk=3) as fake:
            port = receiver.addresses[0][1]
            yield fake.url, f"http://127.0.0.1:{port}/hook"
    finally:
        await receiver.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_chat_arguments(parser, rate=200.0, connections=200)
    parser.add_argument(
        "--against",
        type=Path,
        default=None,
        help="another revision's tree (git archive main | tar -x -C DIR): its workers with"
        " echo as a third variant, to see what this tree's reply path costs echo",
    )
    parser.add_argument(
        "--webhooks",
        action="store_true",
        help="add openai with webhooks on (to a local receiver answering at once)",
    )
    parser.add_argument("--history", type=int, default=20, help="FANOUT_ASSISTANT_HISTORY")
    parser.add_argument("--json", type=Path, default=None, help="write every run here (JSON)")
    parser.add_argument(
        "--variants", default=None, help="comma-separated subset of the variants (echo first)"
    )
    args = parser.parse_args()
    scenario = chat_scenario(args)
    spec = Spec("fanout", nodes=2)
    names = ["echo", "openai"]
    names += ["openai+hooks", "echo+hooks"] if args.webhooks else []
    names += ["echo@tree"] if args.against else []
    names += ["openai+hooks@tree"] if args.against and args.webhooks else []
    if args.variants:
        chosen = args.variants.split(",")
        known = {"echo", "openai", "openai+hooks", "echo+hooks"}
        if chosen[0] != "echo" or not {n.removesuffix("@tree") for n in chosen} <= known:
            parser.error(f"--variants: echo first, then some of {sorted(known)} (or @tree)")
        if args.against is None and any(n.endswith("@tree") for n in chosen):
            parser.error("--variants: @tree needs --against")
        names = chosen
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    started = time.monotonic()
    with (
        chat_services("assistant", "bencha") as services,
        in_thread(fake_model, "the fake model server") as (model_url, hook_url),
    ):
        base = services.env
        variants = {
            "echo": {**base, "FANOUT_ASSISTANT": "echo"},
            "openai": {
                **base,
                "FANOUT_ASSISTANT": "openai",
                "FANOUT_ASSISTANT_URL": model_url,
                "FANOUT_ASSISTANT_MODEL": "fake",
                "FANOUT_ASSISTANT_API_KEY": "sk-bench",
                "FANOUT_ASSISTANT_SYSTEM_PROMPT": "You are a benchmark.",
                "FANOUT_ASSISTANT_HISTORY": str(args.history),
            },
        }
        hooks = {"FANOUT_WEBHOOK_URL": hook_url, "FANOUT_WEBHOOK_SECRET": secrets.token_urlsafe(32)}
        variants["openai+hooks"] = {**variants["openai"], **hooks}
        variants["echo+hooks"] = {**variants["echo"], **hooks}
        variants |= {f"{name}@tree": env for name, env in variants.items()}
        for i in range(args.runs):
            order = names if i % 2 == 0 else names[::-1]
            for name in order:
                tree = args.against if name.endswith("@tree") else None
                with running(spec, variants[name], services.logs, tree) as cluster:
                    # this process' CPU: the fake's thread
                    report = measure_chat(cluster, scenario, variants[name], "fake model")
                results[name].append(report)
                chat = report["chat"]
                print(
                    f"bench: run {i + 1} {name:6} reply p50 {chat['reply_ms']['p50']} ms,"
                    f" p99 {chat['reply_ms']['p99']} ms;"
                    f" replied {chat['replied_on_all_devices']}/{chat['sent']}",
                    file=sys.stderr,
                )
    summaries = {name: chat_summary(results[name], "fake model") for name in names}
    print_chat_heading("bench_assistant.py", args, started)
    others = [n for n in names if n != "echo"]
    print_chat_table(
        summaries,
        width=max(13, *(len(n) + 2 for n in names)),
        base="echo",
        ratios=[(n, f"{n}/echo", max(19, len(n) + 8)) for n in others],
        latency_rows=[*LATENCY_ROWS, ("fake model CPU ms/chat", "fake CPU ms/chat")],
        count_rows=COUNT_ROWS,
    )
    if args.against:
        print(f"\n@tree: the workers of {args.against} (nodes and load generator: this tree)")
    if args.json:
        settings = {"rate": args.rate, "connections": args.connections}
        document = {**settings, "duration": args.duration, "runs": results}
        args.json.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()

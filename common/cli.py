"""The `fanout` command line (SPEC §3)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace

from common.config import ConfigError, Settings
from common.errors import StartError

_DATA_DIR_HELP = (
    "the data folder of a running `fanout up` (default ./.fanout-data): without "
    "FANOUT_JWT_SECRET its development secret signs the tokens"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fanout", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    node = sub.add_parser("node", help="run one WebSocket node")
    node.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    node.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")

    worker = sub.add_parser("worker", help="run one conversation worker")
    worker.add_argument(
        "--port",
        type=int,
        default=None,
        help="serve /healthz, /readyz, /metrics on this port (FANOUT_WORKER_PORT)",
    )
    worker.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="conversations processed at once (FANOUT_WORKER_CONCURRENCY, default "
        f"{Settings().worker_concurrency})",
    )

    sub.add_parser("migrate", help="create the database if missing and upgrade the schema")

    up = sub.add_parser("up", help="run a whole local cluster (Ctrl-C stops it)")
    up.add_argument("--nodes", type=int, default=2, help="WebSocket nodes (default 2)")
    up.add_argument("--workers", type=int, default=2, help="conversation workers (default 2)")
    up.add_argument("--port", type=int, default=8080, help="first node port (default 8080)")
    up.add_argument(
        "--data-dir",
        default=None,
        help="folder for embedded Redis/Postgres (default ./.fanout-data)",
    )

    token = sub.add_parser("token", help="print a signed JWT for local use")
    token.add_argument("user_id")
    token.add_argument(
        "--role",
        action="append",
        choices=["admin", "agent", "service"],
        default=[],
        help="a role to grant (repeatable)",
    )
    token.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    token.add_argument("--data-dir", default=None, help=_DATA_DIR_HELP)

    _loadtest_parser(sub)
    return parser


def _loadtest_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lt = sub.add_parser(
        "loadtest",
        help="drive many WebSocket connections and report throughput, latency and loss",
        description="Load generator (SPEC §8). A delivery is one frame received by one "
        "device. Redis is FANOUT_REDIS_URL (+ FANOUT_NAMESPACE): fanout mode publishes "
        "there with the workers' delivery script.",
    )
    lt.add_argument(
        "--url",
        action="append",
        help="node WebSocket URL, repeatable; connections go round-robin (default: every "
        "node of the `fanout up` running here, else ws://127.0.0.1:8080/ws)",
    )
    lt.add_argument("--mode", choices=["idle", "fanout", "chat"], default="fanout")
    lt.add_argument("--connections", type=int, default=1000, help="connections (default 1000)")
    lt.add_argument("--users", type=int, default=None, help="users (default connections / devices)")
    lt.add_argument("--devices", type=int, default=2, help="devices per user (default 2)")
    lt.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="fanout: deliveries (frames to devices) per second; chat: chats per second; "
        "0 = as fast as possible (default)",
    )
    lt.add_argument("--duration", type=float, default=10.0, help="seconds measured (default 10)")
    lt.add_argument(
        "--ramp", type=float, default=0.0, help="seconds over which to open the connections"
    )
    lt.add_argument("--payload", type=int, default=64, help="payload bytes per frame (default 64)")
    lt.add_argument(
        "--settle", type=float, default=3.0, help="seconds to wait for stragglers (default 3)"
    )
    lt.add_argument(
        "--window",
        type=int,
        default=0,
        help="at --rate 0: frames (chat: chats) in flight at most "
        "(default 2 per connection, at least 1000; chat 200)",
    )
    lt.add_argument(
        "--batch", type=int, default=100, help="users per publish pipeline (default 100)"
    )
    lt.add_argument(
        "--connect-concurrency", type=int, default=200, help="handshakes at once (default 200)"
    )
    lt.add_argument(
        "--connect-timeout",
        type=float,
        default=30.0,
        help="seconds a connection may take before it counts as failed (default 30)",
    )
    lt.add_argument("--secret", default=None, help="HS256 secret (default FANOUT_JWT_SECRET)")
    lt.add_argument(
        "--server-pid",
        type=int,
        action="append",
        help="a node process to read CPU and RSS of from /proc (repeatable)",
    )
    lt.add_argument(
        "--processes",
        type=int,
        default=1,
        help="load generator processes sharing the users (default 1; one process "
        "tops out near one core)",
    )
    lt.add_argument("--shard", type=int, default=None, help=argparse.SUPPRESS)
    lt.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    lt.add_argument(
        "--keep-data",
        action="store_true",
        help="keep the run's users' Redis keys and chat sessions (deleted by default)",
    )
    lt.add_argument("--data-dir", default=None, help=_DATA_DIR_HELP)
    lt.add_argument("--json", action="store_true", help="print the report as JSON")
    lt.add_argument("--quiet", action="store_true", help="no progress line")


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.command == "node":
            settings.require_jwt()
            from node.main import main as run_node

            run_node(settings, args.host, _port(args.port, "--port"))
        elif args.command == "worker":
            if args.port is not None:
                settings = replace(settings, worker_port=_port(args.port, "--port"))
            if args.concurrency is not None:
                if args.concurrency < 1:
                    raise ConfigError("--concurrency must be at least 1")
                settings = replace(settings, worker_concurrency=args.concurrency)
            from worker.main import main as run_worker

            run_worker(settings)
        elif args.command == "migrate":
            applied = _migrate(settings.database_url)
            print(f"schema up to date (applied: {', '.join(map(str, applied)) or 'none'})")
        elif args.command == "up":
            from common.localcluster.up import main as run_up

            run_up(
                settings,
                nodes=args.nodes,
                workers=args.workers,
                port=_port(args.port, "--port"),
                data_dir=args.data_dir,
            )
        elif args.command == "token":
            from common.auth import mint_token

            settings = _local(settings, args.data_dir)
            if not settings.jwt_secret:
                raise ConfigError(
                    "`fanout token` signs with FANOUT_JWT_SECRET: set it, or start "
                    "`fanout up` here first (it makes a development secret)"
                )
            print(
                mint_token(
                    settings.jwt_secret,
                    args.user_id,
                    roles=args.role,
                    ttl=args.ttl,
                    audience=settings.jwt_audience,
                    issuer=settings.jwt_issuer,
                )
            )
        elif args.command == "loadtest":
            from common.loadtest.run import main as run_loadtest

            if not args.url:
                args.url = _local_urls(args.data_dir)
            run_loadtest(args, _local(settings, args.data_dir))
    except ConfigError as exc:
        print(f"fanout: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    except StartError as exc:
        print(f"fanout {args.command}: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def _local(settings: Settings, data_dir: str | None) -> Settings:
    """settings completed from a `fanout up` running in data_dir (secret, Redis, namespace)."""
    import os

    from common.localcluster import devinfo

    return devinfo.for_local_use(settings, devinfo.data_dir(data_dir), os.environ)


def _local_urls(data_dir: str | None) -> list[str] | None:
    """Every node of a `fanout up` running in data_dir, None if none runs there."""
    from common.localcluster import devinfo

    cluster = devinfo.running_cluster(devinfo.data_dir(data_dir))
    return list(cluster.ws_urls) if cluster else None


def _migrate(database_url: str) -> list[int]:
    """The migrations applied; an unreachable database is a StartError (one line)."""
    import asyncpg

    from common.probes import where
    from common.store.schema import migrate_sync

    try:
        return migrate_sync(database_url)
    except (
        OSError,  # refused, unreachable, timed out
        asyncpg.PostgresConnectionError,
        asyncpg.InvalidAuthorizationSpecificationError,  # wrong user or password
    ) as exc:
        raise StartError(
            f"cannot use Postgres at {where(database_url)}: {type(exc).__name__}: {exc}"
        ) from None


def _port(value: int, flag: str) -> int:
    if not 1 <= value <= 65535:
        raise ConfigError(f"{flag} must be between 1 and 65535, got {value}")
    return value


if __name__ == "__main__":
    main()

"""The `fanout` command line (SPEC §3)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace

from common.config import ConfigError, Settings


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
        help="conversations processed at once (FANOUT_WORKER_CONCURRENCY, 32)",
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
        choices=["admin", "agent"],
        default=[],
        help="a role to grant (repeatable)",
    )
    token.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    return parser


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
            from common.schema import migrate_sync

            applied = migrate_sync(settings.database_url)
            print(f"schema up to date (applied: {', '.join(map(str, applied)) or 'none'})")
        elif args.command == "up":
            from common.localcluster import main as run_up

            run_up(
                settings,
                nodes=args.nodes,
                workers=args.workers,
                port=_port(args.port, "--port"),
                data_dir=args.data_dir,
            )
        elif args.command == "token":
            from common.auth import mint_token

            if not settings.jwt_secret:
                raise ConfigError("`fanout token` signs with FANOUT_JWT_SECRET; set it")
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
    except ConfigError as exc:
        print(f"fanout: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def _port(value: int, flag: str) -> int:
    if not 1 <= value <= 65535:
        raise ConfigError(f"{flag} must be between 1 and 65535, got {value}")
    return value


if __name__ == "__main__":
    main()

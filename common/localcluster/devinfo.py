"""What a running `fanout up` leaves in its data folder for the commands it prints.

`jwt-secret`: the development secret (made once, kept across restarts), so that
`fanout token` and `fanout loadtest` sign tokens the cluster accepts without
FANOUT_JWT_SECRET being exported by hand. `cluster.json`: the nodes, Redis and
namespace of the running cluster, so that `fanout loadtest` drives all of its nodes
(written when the cluster is ready, removed when `up` stops).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from common.config import Settings

DEFAULT_DATA_DIR = ".fanout-data"
SECRET_FILE = "jwt-secret"
CLUSTER_FILE = "cluster.json"


def data_dir(given: str | None) -> Path:
    """The data folder: --data-dir, else ./.fanout-data (scripts/dev runs from the repo root)."""
    return Path(given or DEFAULT_DATA_DIR).resolve()


def read_dev_secret(folder: Path) -> str | None:
    """The development secret `fanout up` made in folder, if any."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        kept = (folder / SECRET_FILE).read_text().strip()
        return kept or None
    return None


def dev_secret(folder: Path) -> str:
    """The development secret of folder, made (readable by its owner only) if missing."""
    kept = read_dev_secret(folder)
    if kept:
        return kept
    secret = secrets.token_urlsafe(32)
    fd = os.open(folder / SECRET_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


@dataclass(frozen=True, slots=True)
class LocalCluster:
    """A running `fanout up`, as recorded in its cluster.json."""

    pid: int
    ws_urls: tuple[str, ...]
    redis_url: str
    namespace: str

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's process: it exists
            return True
        return True


@contextlib.contextmanager
def recorded(folder: Path, cluster: LocalCluster) -> Iterator[None]:
    """cluster.json in folder while the block runs."""
    path = folder / CLUSTER_FILE
    body = {
        "pid": cluster.pid,
        "ws_urls": list(cluster.ws_urls),
        "redis_url": cluster.redis_url,
        "namespace": cluster.namespace,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    tmp.replace(path)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def running_cluster(folder: Path) -> LocalCluster | None:
    """The cluster recorded in folder if its `fanout up` still runs."""
    try:
        raw = json.loads((folder / CLUSTER_FILE).read_text())
        found = LocalCluster(
            pid=int(raw["pid"]),
            ws_urls=tuple(str(u) for u in raw["ws_urls"]),
            redis_url=str(raw["redis_url"]),
            namespace=str(raw["namespace"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return found if found.alive() else None


def for_local_use(settings: Settings, folder: Path, env: Mapping[str, str]) -> Settings:
    """settings completed from a local `fanout up`: its secret, its Redis, unless set in env."""
    if not (settings.jwt_secret or settings.jwt_public_key):
        secret = read_dev_secret(folder)
        if secret:
            settings = replace(settings, jwt_secret=secret)
    cluster = running_cluster(folder)
    if cluster is not None:
        if not env.get("FANOUT_REDIS_URL"):
            settings = replace(settings, redis_url=cluster.redis_url)
        if not env.get("FANOUT_NAMESPACE"):
            settings = replace(settings, namespace=cluster.namespace)
    return settings

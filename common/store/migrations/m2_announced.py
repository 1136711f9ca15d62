"""Migration 2: which version of a session was announced, and the indexes that find the rest.

announced_version: the newest version whose `session` frame went out. A change is
committed first and announced after; one that a crash left unannounced is found by the
partial index and announced by the sweeper (worker/sweeper.py).
"""

VERSION = 2

SQL = """
        ALTER TABLE sessions ADD COLUMN announced_version integer NOT NULL DEFAULT 1;
        UPDATE sessions SET announced_version = version WHERE version <> 1;
        CREATE INDEX sessions_unannounced ON sessions (updated_at)
            WHERE announced_version < version;
        CREATE INDEX sessions_created ON sessions (created_at DESC, id DESC);
        """

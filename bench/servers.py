"""The benchmark's own throwaway PostgreSQL and Redis (ops.servers), never the shared ones.

PostgreSQL gets settings sized for a benchmark but durable commits (fsync and
synchronous_commit stay on): the comparison with pgbench must be fair.
"""

from __future__ import annotations

from pathlib import Path

from ops import servers
from ops.servers import Redis, ServerError, find_pg_bin, free_port, port_open

__all__ = [
    "PG_SETTINGS",
    "Postgres",
    "Redis",
    "ServerError",
    "find_pg_bin",
    "free_port",
    "port_open",
]

# Benchmark settings: memory for a 24 GiB machine shared with others, checkpoints
# spread out so none lands in the middle of a 20 s phase, and durability as in
# production. They are recorded with every result.
PG_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",
    "max_connections": "300",
    "shared_buffers": "'1GB'",
    "effective_cache_size": "'4GB'",
    "work_mem": "'16MB'",
    "maintenance_work_mem": "'512MB'",
    "wal_buffers": "'16MB'",
    "max_wal_size": "'8GB'",
    "min_wal_size": "'1GB'",
    "checkpoint_timeout": "'30min'",
    "checkpoint_completion_target": "0.9",
    "random_page_cost": "1.1",
    # JIT compiles the occasional large audit query for longer than it runs.
    "jit": "off",
    # Durable, as in production: each commit waits for its WAL flush.
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "log_min_duration_statement": "-1",
    # Where PostgreSQL's time goes, per phase (a few % of overhead, for pgbench too).
    "shared_preload_libraries": "'pg_stat_statements'",
    "pg_stat_statements.track": "top",
    "log_checkpoints": "on",
}


class Postgres(servers.Postgres):
    """A throwaway cluster with the benchmark's settings, on a free loopback port."""

    def __init__(self, folder: Path | None = None, settings: dict[str, str] | None = None) -> None:
        super().__init__(folder, PG_SETTINGS if settings is None else settings)

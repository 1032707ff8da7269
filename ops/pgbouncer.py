"""PgBouncer in front of PostgreSQL, in transaction pooling mode: `./run.sh pgbouncer`
(what the compose service and the Kubernetes Deployment run; docs/operations.md
"PgBouncer", docs/decisions/0039).

It writes a pgbouncer.ini and its auth file for the PostgreSQL of DATABASE_URL into a
temporary folder, then becomes Debian's pgbouncer in the foreground. Clients (web,
workers, beat) connect to it with DATABASE_URL pointing here and DATABASE_POOLER=pgbouncer;
migrations connect to PostgreSQL itself.

Its environment (all optional but DATABASE_URL):

- DATABASE_URL: the PostgreSQL it pools for. Its user and password are the ones clients
  must present (and the ones it logs in with); without a password, clients are trusted.
  Its `sslmode`, if any, is PgBouncer's to PostgreSQL (server_tls_sslmode).
- PGBOUNCER_LISTEN_ADDR (0.0.0.0), PGBOUNCER_PORT (6432): where clients connect.
- PGBOUNCER_POOL_SIZE (20): server connections per database and user.
- PGBOUNCER_MAX_CLIENT_CONN (1000): client connections at once.
- DB_IDLE_IN_TRANSACTION_TIMEOUT (30): seconds a client may sit idle inside a transaction
  before PgBouncer closes it, and its server connection with it (the locks go too).
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from ops import die
from ops.servers import unprivileged_user

DEFAULT_PORT = 6432
DEFAULT_POOL_SIZE = 20
DEFAULT_MAX_CLIENT_CONN = 1000
DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Upstream:
    """The PostgreSQL behind the pooler, from DATABASE_URL."""

    host: str
    port: int
    user: str
    password: str
    # DATABASE_URL's sslmode, for PgBouncer's own connections to PostgreSQL (managed
    # PostgreSQL often requires TLS).
    sslmode: str = ""

    @classmethod
    def from_url(cls, url: str) -> Upstream:
        parts = urlsplit(url.replace("postgresql+psycopg://", "postgresql://", 1))
        if parts.scheme not in ("postgres", "postgresql") or not parts.hostname:
            raise ValueError(f"DATABASE_URL must be a postgresql:// URL with a host, got {url!r}")
        return cls(
            host=parts.hostname,
            port=parts.port or 5432,
            user=unquote(parts.username or "postgres"),
            password=unquote(parts.password or ""),
            sslmode=parse_qs(parts.query).get("sslmode", [""])[-1],
        )


@dataclass(frozen=True)
class Config:
    upstream: Upstream
    listen_addr: str = "0.0.0.0"  # noqa: S104 - a container's service listens on all
    port: int = DEFAULT_PORT
    pool_size: int = DEFAULT_POOL_SIZE
    max_client_conn: int = DEFAULT_MAX_CLIENT_CONN
    idle_in_transaction_timeout_s: float = DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT_S


def _quoted(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def ini_text(config: Config, auth_file: Path) -> str:
    upstream = config.upstream
    auth_type = "scram-sha-256" if upstream.password else "trust"
    tls = f"server_tls_sslmode = {upstream.sslmode}\n" if upstream.sslmode else ""
    return f"""\
;; Written by ops/pgbouncer.py at each start: edit the variables, not this file.
[databases]
;; Any database name is served by the PostgreSQL of the same name.
* = host={upstream.host} port={upstream.port}

[pgbouncer]
listen_addr = {config.listen_addr}
listen_port = {config.port}
unix_socket_dir =
auth_type = {auth_type}
auth_file = {auth_file}
stats_users = {upstream.user}
;; A server connection serves one transaction, then the next client's: no session state
;; (session advisory locks, SET, LISTEN, prepared statements) may outlive a transaction.
pool_mode = transaction
default_pool_size = {config.pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = {config.max_client_conn}
;; A client waits for a server connection as long as for one of its own pool (common/db.py's
;; pool_timeout): then an error of class 08, which the processes take for an outage.
query_wait_timeout = 5
idle_transaction_timeout = {config.idle_in_transaction_timeout_s:g}
server_connect_timeout = 5
server_login_retry = 1
server_check_query = select 1
server_check_delay = 10
server_lifetime = 3600
server_idle_timeout = 600
{tls}log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
stats_period = 60
"""


def write(config: Config, folder: Path, owner: str | None = None) -> Path:
    """pgbouncer.ini and userlist.txt in `folder`, readable by `owner` alone (the OS user
    pgbouncer runs as; this process's when None). Returns the ini's path."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    auth_file = folder / "userlist.txt"
    ini = folder / "pgbouncer.ini"
    upstream = config.upstream
    texts = {
        auth_file: f"{_quoted(upstream.user)} {_quoted(upstream.password)}\n",
        ini: ini_text(config, auth_file),
    }
    ids = None
    if owner is not None:
        entry = pwd.getpwnam(owner)
        ids = entry.pw_uid, entry.pw_gid
    folder.chmod(0o700)
    if ids:
        os.chown(folder, *ids)
    for path, text in texts.items():
        # Created private: the auth file holds the password.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(text)
        path.chmod(0o600)
        if ids:
            os.chown(path, *ids)
    return ini


def command(ini: Path, binary: str = "pgbouncer") -> list[str]:
    user = unprivileged_user()
    return [binary, *(["-u", user] if user else []), str(ini)]


def _number(name: str, default: float, kind: type[int] | type[float]) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        die(f"{name} must be a number, got {raw!r}", 2)
    if value < (1 if kind is int else 0):
        die(f"{name} must be at least {1 if kind is int else 0}, got {raw!r}", 2)
    return value


def config_from_environment() -> Config:
    try:
        upstream = Upstream.from_url(os.environ.get("DATABASE_URL", ""))
    except ValueError as error:
        die(str(error), 2)
    return Config(
        upstream=upstream,
        listen_addr=os.environ.get("PGBOUNCER_LISTEN_ADDR", "").strip() or "0.0.0.0",  # noqa: S104
        port=int(_number("PGBOUNCER_PORT", DEFAULT_PORT, int)),
        pool_size=int(_number("PGBOUNCER_POOL_SIZE", DEFAULT_POOL_SIZE, int)),
        max_client_conn=int(_number("PGBOUNCER_MAX_CLIENT_CONN", DEFAULT_MAX_CLIENT_CONN, int)),
        idle_in_transaction_timeout_s=_number(
            "DB_IDLE_IN_TRANSACTION_TIMEOUT", DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT_S, float
        ),
    )


def prepare() -> list[str]:
    """The configuration written (to the temporary folder: the image's root filesystem may
    be read-only) and pgbouncer's command line; installs Debian's pgbouncer if missing."""
    from ops import debian

    config = config_from_environment()
    # Debian installs it in /usr/sbin, which a user's PATH may leave out.
    binary = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/sbin")
    if binary is None and debian.ensure("pgbouncer"):
        binary = shutil.which("pgbouncer")
    if binary is None:
        die("pgbouncer is not installed: apt-get install pgbouncer (Debian's package)")
    # One folder per port, rewritten at each start: exec leaves nobody to remove it.
    folder = Path(tempfile.gettempdir()) / f"remit-pgbouncer-{config.port}"
    ini = write(config, folder, unprivileged_user())
    return command(ini, binary)

"""The servers and processes of the multi-host suite, each on its host.

PostgreSQL and Redis are the chaos suite's throwaway servers (ops.servers), started in
the `db` namespace and listening on its address; the app's processes are the chaos
suite's AppProcess/Stack, started by the command compose runs (`./run.sh web`, ...) in
their own hosts' namespaces. Only what differs is here.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import redis

from ops.servers import Postgres, Redis, ServerError
from tests.chaos.harness import CHAOS_PG_SETTINGS, ROOT, AppProcess, Stack
from tests.multihost.latency import LatencyRelay
from tests.multihost.net import GATEWAY, SUBNET, TEMP_PREFIX, Host, Network

PG_PORT = 5432
REDIS_PORT = 6379
WEB_PORT = 8000
# The latency relay's port on the gateway (tests/multihost/latency.py).
RELAY_PORT = 15432


class HostPostgres(Postgres):
    """A throwaway cluster whose server runs in `host`'s namespace, on its address."""

    def __init__(self, host: Host, settings: dict[str, str]) -> None:
        folder = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX + "pg-"))
        super().__init__(folder, settings, port=PG_PORT)
        self.host = host

    def _as_pg_user(self, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        # As ops.servers does, but entering the namespace first (as root).
        if self.os_user is not None:
            argv = ["runuser", "-u", self.os_user, "--", *argv]
        return subprocess.run(  # type: ignore[call-overload]
            ["ip", "netns", "exec", self.host.namespace, *argv],
            cwd="/", check=False, start_new_session=True, **kwargs,
        )  # fmt: skip

    def init(self) -> None:
        super().init()
        # The other hosts connect by address, from the suite's own subnet only.
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {SUBNET}.0/24 trust\n")

    def _pg_ctl(self, *args: str, what: str) -> None:
        # ops.servers listens on loopback; here the server listens on the db host's address.
        args = tuple(
            arg.replace("listen_addresses=127.0.0.1", f"listen_addresses={self.host.address}")
            for arg in args
        )
        super()._pg_ctl(*args, what=what)

    def running(self) -> bool:
        if not (self.data / "postmaster.pid").exists():
            return False
        try:
            with psycopg.connect(self.conninfo(), connect_timeout=2):
                return True
        except psycopg.Error:
            return False

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@{self.host.address}:{self.port}/{database}"

    def conninfo(self, database: str = "postgres") -> str:
        return (
            f"host={self.host.address} port={self.port} user=postgres dbname={database} "
            "connect_timeout=5"
        )


class HostRedis(Redis):
    """A redis-server with nothing saved, in `host`'s namespace, on its address."""

    def __init__(self, host: Host) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix=TEMP_PREFIX + "redis-")), port=REDIS_PORT)
        self.host = host

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerError("no redis-server: apt-get install redis-server")
        self.starts += 1
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", self.host.namespace, binary, "--bind", self.host.address,
             "--port", str(self.port), "--save", "", "--appendonly", "no",
             # Reached from the other hosts, on the suite's private bridge only.
             "--protected-mode", "no",
             "--dir", str(self.folder), "--logfile", str(self.log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        client = redis.Redis(host=self.host.address, port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 20
        try:
            while True:
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise ServerError(f"Redis does not answer on {self.host.address}")
                time.sleep(0.1)
        finally:
            client.close()

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host.address}:{self.port}/{db}"

    def command(self, *args: str) -> object:
        client = redis.Redis(host=self.host.address, port=self.port, socket_timeout=5)
        try:
            return client.execute_command(*args)
        finally:
            client.close()


# Hosts and what each runs: the compose service's own command.
SERVICES = {"web": "web", "worker-a": "worker", "worker-b": "worker", "beat": "beat"}


class MultiHostStack(Stack):
    """The chaos Stack, its processes spread over the hosts: `./run.sh <service>` in the
    host's namespace, reached by address."""

    def __init__(self, net: Network, pg: HostPostgres, redis_server: HostRedis, *,
                 database: str, log_dir: Path, settings: dict[str, str]) -> None:  # fmt: skip
        super().__init__(pg, redis_server, database, log_dir, settings=settings)
        self.net = net
        self.web_port = WEB_PORT
        # The web host's database path goes through this relay (latency on demand).
        self.relay = LatencyRelay((GATEWAY, RELAY_PORT), (net["db"].address, PG_PORT))
        self.relay.start()

    def env(self, name: str, *, redis_url: str | None = None) -> dict[str, str]:
        env = super().env(name, redis_url=redis_url)
        if name == "web":
            env["DATABASE_URL"] = (
                f"postgresql+psycopg://postgres@{GATEWAY}:{RELAY_PORT}/{self.database}"
            )
        return env

    def stop_all(self) -> None:
        super().stop_all()
        self.relay.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self.net['web'].address}:{self.web_port}"

    def start_host(self, host: str) -> AppProcess:
        """(Re)start the host's service, as its host booting would."""
        process = self.processes.get(host)
        if process is None:
            argv = [*self.net[host].prefix(), str(ROOT / "run.sh"), SERVICES[host]]
            process = AppProcess(host, argv, self.env(host), self.log_dir)
            self.processes[host] = process
        process.start()
        return process

    def kill_host(self, host: str) -> int:
        """SIGKILL every process of the host's namespace, as a power loss."""
        process = self.processes[host]
        process.expected_exit = True
        killed = self.net.kill_host(host)
        process.kill()  # reaps the popen
        return killed


# The chaos suite's settings, but every COMMIT written before its answer: an immediate
# shutdown loses what asynchronous commit had not yet written, 202s included. (fsync
# may stay off: the machine itself does not crash.)
MULTIHOST_PG_SETTINGS = {**CHAOS_PG_SETTINGS, "synchronous_commit": "on"}


def start_servers(net: Network) -> tuple[HostPostgres, HostRedis]:
    pg = HostPostgres(net["db"], MULTIHOST_PG_SETTINGS)
    redis_server = HostRedis(net["db"])
    try:
        pg.start()
        redis_server.start()
    except BaseException:
        redis_server.destroy()
        pg.destroy()
        raise
    return pg, redis_server

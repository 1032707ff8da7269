"""The multi-host suite's network faults do what they say, and only that."""

from __future__ import annotations

import subprocess

import pytest

from tests.chaos.harness import wait_until
from tests.multihost.harness import PG_PORT, REDIS_PORT, HostPostgres, HostRedis
from tests.multihost.net import Network, ns_pids

pytestmark = pytest.mark.slow


def reaches(network: Network, host: str, address: str, port: int) -> bool:
    """Can `host` open a TCP connection to address:port within 2 s?"""
    probe = f"exec 3<>/dev/tcp/{address}/{port}"
    return network[host].run("timeout", "2", "bash", "-c", probe, check=False).returncode == 0


def test_cut_drops_one_port_and_heal_restores_it(
    network: Network, db_servers: tuple[HostPostgres, HostRedis]
) -> None:
    db = network["db"].address
    assert reaches(network, "worker-a", db, PG_PORT)
    network.cut("worker-a", "db", PG_PORT)
    try:
        assert not reaches(network, "worker-a", db, PG_PORT)
        # Its broker and the other hosts are untouched.
        assert reaches(network, "worker-a", db, REDIS_PORT)
        assert reaches(network, "worker-b", db, PG_PORT)
    finally:
        network.heal("worker-a")
    assert reaches(network, "worker-a", db, PG_PORT)


def test_unplug_takes_the_whole_host_off(
    network: Network, db_servers: tuple[HostPostgres, HostRedis]
) -> None:
    db = network["db"].address
    network.unplug("worker-b")
    try:
        assert not reaches(network, "worker-b", db, REDIS_PORT)
        assert reaches(network, "worker-a", db, REDIS_PORT)
    finally:
        network.plug("worker-b")
    # The link comes back up and the neighbour entry is learnt again: give it a moment.
    wait_until(lambda: reaches(network, "worker-b", db, REDIS_PORT), 15, 0.2, "worker-b back")


def test_kill_host_leaves_no_process(network: Network) -> None:
    host = network["beat"]
    sleeper = subprocess.Popen([*host.prefix(), "sleep", "600"])
    try:
        wait_until(lambda: ns_pids(host.namespace), 10, 0.05, "the sleeper inside beat")
        assert network.kill_host("beat") >= 1
        assert sleeper.wait(5) == -9
    finally:
        sleeper.kill()
        sleeper.wait()

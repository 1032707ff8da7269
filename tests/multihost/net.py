"""The multi-host suite's network: namespaces, veth pairs, one bridge, and the faults
that only a network can make (docs/decisions/0041).

Every name starts with PREFIX and every address is inside SUBNET: the cleanup of a
crashed earlier run removes exactly those, nothing of the machine's own. A lock file
keeps two runs from sharing (and cleaning up) one topology.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ops import debian

PREFIX = "rmt17-"
BRIDGE = "rmt17br0"
SUBNET = "10.217.0"
# The root namespace's address on the bridge: the clients (and the test's probes) use it.
GATEWAY = f"{SUBNET}.1"
LOCK = Path("/run/lock/remit-multihost.lock")

# Host name -> last octet. The names are the issue's; their namespaces and root-side
# veths are PREFIX + a short form (interface names are limited to 15 bytes).
HOSTS = {"db": 2, "web": 3, "worker-a": 4, "worker-b": 5, "beat": 6}
SHORT = {"db": "db", "web": "web", "worker-a": "wa", "worker-b": "wb", "beat": "beat"}


class NetError(RuntimeError):
    pass


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if check and result.returncode != 0:
        raise NetError(f"{' '.join(argv)}: {(result.stderr or result.stdout).strip()}")
    return result


def missing() -> str | None:
    """Why this machine cannot run the suite, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs, a bridge)"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"needs {tool} (iproute2 / util-linux)"
    probe = f"{PREFIX}probe"
    made = sh("ip", "netns", "add", probe, check=False)
    sh("ip", "netns", "del", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    return None


def namespaces() -> list[str]:
    listed = sh("ip", "netns", "list", check=False).stdout.splitlines()
    return [line.split()[0] for line in listed if line.startswith(PREFIX)]


def ns_pids(namespace: str) -> list[int]:
    out = sh("ip", "netns", "pids", namespace, check=False).stdout
    return [int(pid) for pid in out.split()]


def kill_namespace_processes(namespace: str, timeout: float = 10) -> int:
    """SIGKILL every process of the namespace (a host losing power); returns how many."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while pids := ns_pids(namespace):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        if time.monotonic() > deadline:
            raise NetError(f"processes of {namespace} survive SIGKILL: {pids}")
        time.sleep(0.05)
    return len(killed)


# Folders of the servers on `db` (PostgreSQL's cluster, Redis's folder).
TEMP_PREFIX = "remit-multihost-"


def remove_leftovers() -> None:
    """What a crashed earlier run left: its processes, namespaces, veths and bridge, and
    its servers' temporary folders."""
    for namespace in namespaces():
        kill_namespace_processes(namespace)
        sh("ip", "netns", "del", namespace, check=False)
    links = sh("ip", "-o", "link", "show", check=False).stdout.splitlines()
    for line in links:
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(PREFIX) or name == BRIDGE:
            sh("ip", "link", "del", name, check=False)
    for folder in Path(tempfile.gettempdir()).glob(TEMP_PREFIX + "*"):
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class Host:
    name: str
    address: str

    @property
    def namespace(self) -> str:
        return PREFIX + SHORT[self.name]

    def prefix(self) -> list[str]:
        """The command prefix that runs a program on this host: in its namespace, with a
        hostname of its own (Celery names its nodes after it)."""
        return ["ip", "netns", "exec", self.namespace, "unshare", "--uts", "--",
                "sh", "-c", f'hostname {self.name} && exec "$0" "$@"']  # fmt: skip

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.namespace, *argv, check=check)


class Network:
    """The hosts on one bridge. `create()` first removes any leftover of an earlier run;
    `destroy()` is registered with atexit as well, for a run that ends abruptly."""

    def __init__(self) -> None:
        self.hosts = {name: Host(name, f"{SUBNET}.{octet}") for name, octet in HOSTS.items()}
        self._lock: int | None = None
        self.iptables: str | None = None

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def create(self) -> None:
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        # Another run of this suite owns the topology meanwhile: wait for it.
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        atexit.register(self.destroy)
        remove_leftovers()
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for host in self.hosts.values():
            outside = PREFIX + SHORT[host.name]
            sh("ip", "netns", "add", host.namespace)
            sh("ip", "link", "add", outside, "type", "veth", "peer", "name", "eth0",
               "netns", host.namespace)  # fmt: skip
            sh("ip", "link", "set", outside, "master", BRIDGE)
            sh("ip", "link", "set", outside, "up")
            host.run("ip", "link", "set", "lo", "up")
            host.run("ip", "addr", "add", f"{host.address}/24", "dev", "eth0")
            host.run("ip", "link", "set", "eth0", "up")

    def destroy(self) -> None:
        """Idempotent: every process of the hosts killed, then every name removed."""
        remove_leftovers()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    # --- faults -------------------------------------------------------------------------

    def _ensure_iptables(self) -> str:
        if self.iptables is None:
            if not debian.ensure("iptables"):
                raise NetError("iptables is missing and could not be installed")
            self.iptables = shutil.which("iptables") or "iptables"
        return self.iptables

    def cut(self, host: str, peer: str, port: int) -> None:
        """Silently drop `host`'s TCP traffic with `peer`:`port`, both ways (a firewall or
        a broken route, not a refusal): open connections hang, new ones time out."""
        iptables, node, other = self._ensure_iptables(), self[host], self[peer].address
        node.run(iptables, "-I", "OUTPUT", "-p", "tcp", "-d", other, "--dport", str(port),
                 "-j", "DROP")  # fmt: skip
        node.run(iptables, "-I", "INPUT", "-p", "tcp", "-s", other, "--sport", str(port),
                 "-j", "DROP")  # fmt: skip

    def heal(self, *hosts: str) -> None:
        """Every filter rule and shaping of `hosts` removed."""
        for host in hosts:
            node = self[host]
            if self.iptables is not None:
                node.run(self.iptables, "-F", "OUTPUT")
                node.run(self.iptables, "-F", "INPUT")
            node.run("tc", "qdisc", "del", "dev", "eth0", "root", check=False)

    def unplug(self, host: str) -> None:
        """The whole host off the network (its cable pulled)."""
        sh("ip", "link", "set", PREFIX + SHORT[host], "down")

    def plug(self, host: str) -> None:
        sh("ip", "link", "set", PREFIX + SHORT[host], "up")

    def shape(self, host: str, address: str, rate: str) -> None:
        """`host`'s packets to `address` limited to `rate` (an htb class; its other
        traffic is not shaped): queueing delay once the link is busy. Undone by heal."""
        node = self[host]
        node.run("tc", "qdisc", "replace", "dev", "eth0", "root", "handle", "1:", "htb",
                 "default", "20")  # fmt: skip
        node.run("tc", "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:10",
                 "htb", "rate", rate)  # fmt: skip
        node.run("tc", "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:20",
                 "htb", "rate", "10gbit")  # fmt: skip
        node.run("tc", "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip",
                 "u32", "match", "ip", "dst", f"{address}/32", "flowid", "1:10")  # fmt: skip

    def lossy(self, host: str, address: str, port: int, loss: float) -> None:
        """A random `loss` share of `host`'s TCP packets with `address`:`port`, both ways,
        dropped (iptables' statistic match: netem's loss is missing here). Undone by heal."""
        iptables, node = self._ensure_iptables(), self[host]
        for chain, way, port_side in (("OUTPUT", "-d", "--dport"), ("INPUT", "-s", "--sport")):
            node.run(iptables, "-I", chain, "-p", "tcp", way, address, port_side, str(port),
                     "-m", "statistic", "--mode", "random", "--probability", str(loss),
                     "-j", "DROP")  # fmt: skip

    def kill_host(self, host: str) -> int:
        return kill_namespace_processes(self[host].namespace)

"""Faults of hosts that fail apart, while clients keep submitting (issue 17, item 1).

Five network namespaces on one bridge (docs/decisions/0041): `db` runs PostgreSQL and
Redis, `web`, `worker-a`, `worker-b` and `beat` each run their compose service's own
command (`./run.sh web`, ...). The chaos suite's clients submit from the root namespace,
by address. One fault at a time, each healed, each followed by checks: settlement
resumes within 30 s of the heal, every transfer accepted before the heal is final (settled
or rejected) exactly as asked, no idempotency key is doubled, and the audit is clean
(each settled transfer has exactly its legs). At the end, once drained, the same for
every accepted transfer, the balances replay, and no client saw a 5xx other than a 503
with Retry-After while PostgreSQL was down.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from common.audit import CHECKS as AUDIT_CHECKS
from tests.chaos.checks import (
    check_accepted,
    check_holds,
    check_keys,
    check_replay,
    check_transfers,
    drain,
    fund,
    percentiles,
    read_ledger,
)
from tests.chaos.harness import ROOT, install_slow_batches, wait_until
from tests.chaos.load import Load, Recorder, Submitted, register_users
from tests.multihost.harness import (
    PG_PORT,
    REDIS_PORT,
    RELAY_PORT,
    HostPostgres,
    HostRedis,
    MultiHostStack,
)
from tests.multihost.net import GATEWAY, Network, ns_pids

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

SUMMARY_FILE = ROOT / ".run" / "multihost-summary.txt"
USERS = int(os.environ.get("MULTIHOST_USERS", "40"))
CLIENTS = int(os.environ.get("MULTIHOST_CLIENTS", "16"))
FUNDING = {"USD": "300.00", "EUR": "200.00"}
# The bound: after each heal, a transfer settles within this.
RESUME_BOUND_S = 30.0
# After each heal, everything accepted before it is final within this (a transfer whose
# attempt failed in the fault waits for beat's retry).
FINAL_BOUND_S = 60.0
DRAIN_BOUND_S = 90.0
# A 503 is acceptable only while PostgreSQL is down, or this soon after it is back
# (a pool reconnecting, a request that started during the outage).
OUTAGE_SLACK_S = 10.0
# The degraded link: what replaces netem's 200 ms + 5 % loss (decision 0041).
DEGRADED_DELAY_S = 0.2
DEGRADED_LOSS = 0.05
DEGRADED_RATE = "4mbit"
SETTINGS = {
    "WEB_CONCURRENCY": "2",
    "WORKER_CONCURRENCY": "2",
}


# --- the network's faults do what they say, and only that ------------------------------


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


# --- the hosts failing apart under load ---------------------------------------------------


def answered_between(recorder: Recorder, start: float, end: float) -> list[float]:
    """How long the answered, non-5xx requests sent between start and end took."""
    return [
        a.elapsed for a in recorder.answers if a.status and a.status < 500 and start <= a.at < end
    ]


SETTLE_DONE = re.compile(r"Task remit\.settle\[[0-9a-f-]{36}\] succeeded")


@dataclass
class Event:
    name: str
    started: float
    healed: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)
    resumed_s: float | None = None
    final_s: float | None = None
    unfinished: list[str] = field(default_factory=list)
    audit: str = ""


class Scenario:
    """The faults, one after another, each healed and checked before the next."""

    def __init__(self, stack: MultiHostStack, net: Network, load: Load) -> None:
        self.stack = stack
        self.net = net
        self.load = load
        self.events: list[Event] = []
        self.pg_down: list[tuple[float, float]] = []
        self.web_down: list[tuple[float, float]] = []

    def run(self, name: str, fault: Callable[[Event], None]) -> Event:
        event = Event(name, time.monotonic())
        self.events.append(event)
        fault(event)
        event.healed = event.healed or time.monotonic()
        accepted = list(self.load.submitted)
        event.detail["accepted before the heal"] = len(accepted)
        event.resumed_s = self._resumed(event.healed)
        host = event.detail.get("host")
        if host:
            event.detail["host settles again after s"] = self._host_settles(host, event)
        event.unfinished, event.final_s = self._final_once(event, accepted)
        violations = self._audit()
        event.audit = "clean" if not violations else "; ".join(violations)[-2000:]
        return event

    def _final_once(self, event: Event, accepted: list[Submitted]) -> tuple[list[str], float]:
        """Wait (bounded) until every transfer in `accepted` is settled or rejected as
        asked, with no idempotency key doubled: what is still wrong, and the seconds from
        the heal."""
        while True:
            transfers = read_ledger(self.stack)[0]
            problems = check_accepted(transfers, accepted) + check_keys(transfers)
            problems += [
                f"transfer {item.transfer_id} failed, not yet retried"
                for item in accepted
                if item.transfer_id in transfers and transfers[item.transfer_id][1] == "failed"
            ]
            waited = round(time.monotonic() - event.healed, 2)
            if not problems or waited >= FINAL_BOUND_S:
                return problems[:20], waited
            time.sleep(0.5)

    def _audit(self) -> list[str]:
        """The audit's own checks (common/audit.py), in this process: the CLI's start
        costs seconds on a busy machine, six times over. The end of the test runs the
        CLI itself."""
        violations = []
        with self.stack.pg.connect(self.stack.database) as connection:
            for check in AUDIT_CHECKS:
                violations += [f"{check.name}: {row}" for row in connection.execute(check.sql)]
        return violations

    def _resumed(self, healed: float) -> float | None:
        """Seconds from the heal to the first transfer settled after it (None: not within
        the bound). The database's clock is this machine's."""
        since = time.time() - (time.monotonic() - healed)
        deadline = healed + RESUME_BOUND_S
        while time.monotonic() < deadline:
            try:
                with self.stack.pg.connect(self.stack.database) as connection:
                    row = connection.execute(
                        "SELECT extract(epoch FROM min(settled_at))::float8 FROM transfers "
                        "WHERE settled_at > to_timestamp(%s)",
                        (since,),
                    ).fetchone()
            except Exception:  # PostgreSQL still coming back: ask again
                row = None
            if row and row[0] is not None:
                return round(row[0] - since, 2)
            time.sleep(0.25)
        return None

    def _host_settles(self, host: str, event: Event) -> float | None:
        """Seconds from the heal until `host`'s own worker finished a settle task."""
        log = self.stack.processes[host].log_path
        offset = event.detail.pop("log_offset")
        while time.monotonic() < event.healed + RESUME_BOUND_S:
            with log.open("rb") as text:
                text.seek(offset)
                if SETTLE_DONE.search(text.read().decode(errors="replace")):
                    return round(time.monotonic() - event.healed, 2)
            time.sleep(0.25)
        return None

    def _healed(self, event: Event, host: str) -> None:
        event.healed = time.monotonic()
        log = self.stack.processes[host].log_path
        event.detail.update(host=host, log_offset=log.stat().st_size)

    # --- the faults -----------------------------------------------------------------

    def kill_worker_host(self, event: Event, host: str = "worker-b", down_s: float = 3.0) -> None:
        """Every process of the host SIGKILLed at once, mid-batch if one is caught within
        a few seconds; the host boots again later."""
        event.detail["mid_batch"] = self._catch_batch(host)
        event.detail["killed"] = self.stack.kill_host(host)
        time.sleep(down_s)
        self._healed(event, host)
        self.stack.start_host(host)

    def partition_from_pg(self, event: Event, host: str = "worker-a", cut_s: float = 8.0) -> None:
        """The host's PostgreSQL traffic dropped, mid-batch: its Redis connection stays."""
        mid_batch = self._catch_batch(host)
        self.net.cut(host, "db", PG_PORT)
        event.detail.update(mid_batch=mid_batch, cut_s=cut_s)
        time.sleep(cut_s)
        self.net.heal(host)
        self._healed(event, host)

    def _catch_batch(self, host: str, patience_s: float = 10.0) -> bool:
        """Wait (a while) until `host` is inside a settlement batch."""
        started = time.monotonic()
        while time.monotonic() - started < patience_s:
            if self._in_batch(host):
                return True
            time.sleep(0.01)
        return False

    def _in_batch(self, host: str) -> bool:
        """A backend of `host` is inside a batch (the slow-batch trigger's sleep)."""
        with self.stack.pg.connect() as connection:
            return bool(
                connection.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                    "AND wait_event = 'PgSleep'",
                    (f"remit-{host}",),
                ).fetchone()[0]
            )

    def redis_restart_empty(self, event: Event, down_s: float = 2.0) -> None:
        redis_server = self.stack.redis
        event.detail["doorbells_lost"] = redis_server.command("LLEN", "celery")
        redis_server.stop()
        time.sleep(down_s)
        redis_server.start()
        event.healed = time.monotonic()

    def pg_immediate_restart(self, event: Event, down_s: float = 4.0) -> None:
        pg = self.stack.pg
        assert isinstance(pg, HostPostgres)
        stopped = time.monotonic()
        pg.stop("immediate")
        time.sleep(down_s)
        pg.start()
        wait_until(pg.running, 60, what="PostgreSQL to be back")
        event.healed = time.monotonic()
        self.pg_down.append((stopped, event.healed))

    def kill_web_host(self, event: Event, down_s: float = 2.0) -> None:
        """The web host dies with requests in flight; clients re-send with their keys."""
        killed_at = time.monotonic()
        event.detail["killed"] = self.stack.kill_host("web")
        time.sleep(down_s)
        self.stack.start_host("web")
        self.stack.wait_web()
        event.healed = time.monotonic()
        self.web_down.append((killed_at, event.healed))

    def degraded_web_db(self, event: Event, recorder: Recorder, hold_s: float = 8.0) -> None:
        """The web<->db path slow and lossy: 200 ms more per round trip (the relay), 5 %
        of packets dropped (iptables statistic), a rate limit (htb). No netem here."""
        # A steady stretch first, for the latency the clients see without the fault.
        baseline = time.monotonic()
        time.sleep(5)
        before = answered_between(recorder, baseline, time.monotonic())
        started = event.started = time.monotonic()
        self.stack.relay.delay_s = DEGRADED_DELAY_S / 2
        self.net.lossy("web", GATEWAY, RELAY_PORT, DEGRADED_LOSS)
        self.net.shape("web", GATEWAY, DEGRADED_RATE)
        time.sleep(hold_s)
        self.net.heal("web")
        self.stack.relay.delay_s = 0.0
        event.healed = time.monotonic()
        during = answered_between(recorder, started, event.healed)
        event.detail.update(
            added_round_trip_s=DEGRADED_DELAY_S,
            loss=DEGRADED_LOSS,
            rate=DEGRADED_RATE,
            **{"http p50/p99 s before": percentiles(before), "during": percentiles(during)},
        )

    # --- what clients may see -------------------------------------------------------

    def unexplained_503(self, recorder: Recorder) -> list[str]:
        return [
            f"503 at {a.at - self.events[0].started:.1f}s {a.method} {a.route}"
            for a in recorder.answers
            if a.status == 503
            and not any(start <= a.at <= end + OUTAGE_SLACK_S for start, end in self.pg_down)
        ]

    def unexplained_silence(self, recorder: Recorder) -> list[str]:
        """Requests that got no answer, other than the keep-alive race and those sent
        while the web host was down (re-sent by their clients)."""
        return [
            f"no answer at {a.at - self.events[0].started:.1f}s {a.method} {a.route}: {a.error}"
            for a in recorder.no_answer()
            if not any(start - 1 <= a.at <= end + 1 for start, end in self.web_down)
        ]


def test_hosts_failing_apart(
    network: Network, db_servers: tuple[HostPostgres, HostRedis], multihost_logs: Path
) -> None:
    started = time.monotonic()
    pg, redis_server = db_servers
    database = "remit_multihost"
    pg.create_database(database)
    redis_server.command("FLUSHALL")
    stack = MultiHostStack(
        network, pg, redis_server, database=database, log_dir=multihost_logs, settings=SETTINGS
    )
    stack.migrate()
    # Each batch sleeps inside its transaction: the window a mid-batch cut aims at.
    install_slow_batches(pg, database, 0.15)
    try:
        for host in ("web", "worker-a", "worker-b", "beat"):
            stack.start_host(host)
        stack.wait_web(90)
        for host in ("worker-a", "worker-b"):
            stack.wait_worker_ready(host, 90)

        recorder = Recorder()
        users = register_users(stack.base_url, USERS)
        funding_ids = fund(stack, users, recorder, FUNDING)
        wait_until(
            lambda: stack.status_counts().get("pending", 0) == 0, 60, 0.2, "the funding to settle"
        )
        setup_s = time.monotonic() - started

        load = Load(stack.base_url, users, recorder, clients=CLIENTS, max_per_client=10_000)
        scenario = Scenario(stack, network, load)
        stack.watch()
        load.start()
        load_started = time.monotonic()
        try:
            time.sleep(3)
            scenario.run("worker-b host killed", scenario.kill_worker_host)
            scenario.run("worker-a cut from PostgreSQL mid-batch", scenario.partition_from_pg)
            scenario.run("Redis restarted empty", scenario.redis_restart_empty)
            scenario.run("PostgreSQL immediate restart", scenario.pg_immediate_restart)
            scenario.run("web host killed, requests in flight", scenario.kill_web_host)
            scenario.run(
                "web<->db link degraded",
                lambda event: scenario.degraded_web_db(event, recorder),
            )
            time.sleep(2)
        finally:
            load.finish()
        load_s = time.monotonic() - load_started

        drain_s, counts = drain(stack, DRAIN_BOUND_S)
        transfers, commission_accounts, balances, holds, stuck = read_ledger(stack)
        accepted = load.submitted
        problems = check_transfers(transfers, accepted, funding_ids)
        problems += check_replay(transfers, commission_accounts, balances)
        problems += check_holds(holds, load.holds)
        audit_status, audit_report = stack.audit()
        crashes = list(stack.crashes)
    finally:
        stack.stop_all()

    summary = {
        "transfers accepted": len(accepted),
        "http answers": recorder.by_status(),
        "faults": [
            f"{e.name}: {e.detail} healed {e.healed - e.started:.1f}s, "
            f"settled again {e.resumed_s}s after, all accepted final {e.final_s}s after, "
            f"audit {e.audit}"
            for e in scenario.events
        ],
        "final statuses": counts,
        "setup / load / drain s": f"{setup_s:.1f} / {load_s:.1f} / {drain_s:.1f}",
        "processes that crashed": crashes,
    }
    text = "\n".join(f"{key}: {value}" for key, value in summary.items())
    SUMMARY_FILE.parent.mkdir(parents=True, exist_ok=True)
    SUMMARY_FILE.write_text(
        f"multi-host suite run of {time.strftime('%Y-%m-%d %H:%M:%S')}\n{text}\n"
    )
    print(text)

    assert not load.unexpected, load.unexpected[:20]
    assert not load.gave_up, load.gave_up[:20]
    assert not load.resend_mismatches, load.resend_mismatches[:20]
    assert not recorder.bad_5xx(), recorder.bad_5xx()[:20]
    assert not scenario.unexplained_503(recorder), scenario.unexplained_503(recorder)[:20]
    assert not scenario.unexplained_silence(recorder), scenario.unexplained_silence(recorder)[:20]
    for event in scenario.events:
        assert event.resumed_s is not None, f"no settlement within 30 s after: {event}"
        assert not event.unfinished, event
        if "host" in event.detail:
            assert event.detail["host settles again after s"] is not None, event
        assert event.audit == "clean", event
    assert not counts.get("pending"), (f"pending after {DRAIN_BOUND_S:.0f} s", stuck)
    assert audit_status == 0, audit_report
    assert not problems, problems[:30]
    assert not crashes, crashes
    assert len(accepted) >= 300, f"only {len(accepted)} transfers were accepted"

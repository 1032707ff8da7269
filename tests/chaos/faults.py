"""The faults the chaos suite injects into a running stack, each one logged."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tests.chaos.harness import Stack, wait_until

if TYPE_CHECKING:
    from tests.chaos.deliveries import ChaosReceiver

# How long a mid-batch kill waits to catch the worker inside a batch before killing anyway.
CATCH_BATCH_S = 8.0
# How long a SIGTERMed worker may take before it is killed (the test asserts far less).
SIGTERM_EXIT_BOUND_S = 60.0

DUPLICATE_DOORBELL = """
import uuid
from worker.tasks import settle
for currency in ("USD", "EUR"):
    task_id = str(uuid.uuid4())
    for _ in range(2):
        settle.apply_async((currency, None, None), task_id=task_id)
print("published")
"""


@dataclass
class Fault:
    name: str
    target: str
    at: float
    took: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


class Faults:
    def __init__(self, stack: Stack, receiver: ChaosReceiver | None = None) -> None:
        self.stack = stack
        self.receiver = receiver
        self.log: list[Fault] = []
        self.errors: list[str] = []
        self.t0 = time.monotonic()
        self._restarts: list[threading.Thread] = []

    def counts(self) -> dict[str, int]:
        return dict(Counter(fault.name for fault in self.log))

    def run(self, plan: list[tuple[float, str, tuple[Any, ...]]]) -> None:
        """Run `plan` ((seconds after start, method name, args), ...) in order."""
        self.t0 = time.monotonic()
        for at, name, args in plan:
            delay = self.t0 + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            started = time.monotonic()
            fault = Fault(name, ",".join(map(str, args)), round(started - self.t0, 1))
            try:
                fault.detail = getattr(self, name)(*args) or {}
            except Exception as error:
                self.errors.append(f"{name}{args}: {error!r}")
                fault.detail = {"error": repr(error)}
            fault.took = round(time.monotonic() - started, 2)
            self.log.append(fault)
        for thread in self._restarts:
            thread.join(120)

    # --- workers ----------------------------------------------------------------------------

    def _catch_batch(
        self, worker: str, patience_s: float = CATCH_BATCH_S
    ) -> tuple[int | None, float]:
        """Wait until `worker` is inside a settlement batch; its settling process pid."""
        started = time.monotonic()
        while time.monotonic() - started < patience_s:
            pid = self.stack.settling_backend(worker)
            if pid is not None:
                return pid, time.monotonic() - started
            time.sleep(0.01)
        return None, time.monotonic() - started

    def kill_child_mid_batch(self, worker: str) -> dict[str, Any]:
        """SIGKILL the pool process that is inside a batch; the node replaces it."""
        pid, waited = self._catch_batch(worker)
        if pid is None or pid == self.stack.processes[worker].pid:
            # Not caught inside a batch in time: kill the whole node instead (and restart it).
            self.stack.processes[worker].kill()
            self._restart_later(worker, 1.0)
            return {"mid_batch": False, "waited_s": round(waited, 2), "fallback": "node killed"}
        os.kill(pid, signal.SIGKILL)
        return {"mid_batch": True, "pid": pid, "waited_s": round(waited, 2)}

    def kill_node_mid_batch(self, worker: str, down_s: float = 1.0) -> dict[str, Any]:
        """SIGKILL a whole worker node (main process and pool) mid-batch; restart it."""
        pid, waited = self._catch_batch(worker)
        self.stack.processes[worker].kill()
        self._restart_later(worker, down_s)
        return {"mid_batch": pid is not None, "waited_s": round(waited, 2)}

    def _restart_later(self, worker: str, delay: float) -> None:
        def restart() -> None:
            time.sleep(delay)
            self.stack.restart(worker)

        thread = threading.Thread(target=restart, name=f"restart-{worker}")
        thread.start()
        self._restarts.append(thread)

    def stop_worker(self, worker: str, stopped_s: float) -> dict[str, Any]:
        """SIGSTOP a whole node for `stopped_s`, then SIGCONT: frozen, it holds its
        messages (and maybe a batch in the middle of its transaction) meanwhile."""
        process = self.stack.processes[worker]
        pid, _ = self._catch_batch(worker, patience_s=4.0)
        process.signal_group(signal.SIGSTOP)
        mid_batch = pid is not None

        def resume() -> None:
            time.sleep(stopped_s)
            process.signal_group(signal.SIGCONT)

        thread = threading.Thread(target=resume, name=f"resume-{worker}")
        thread.start()
        self._restarts.append(thread)
        return {"mid_batch": mid_batch, "stopped_s": stopped_s}

    def sigterm_mid_batch(self, worker: str) -> dict[str, Any]:
        """SIGTERM (warm shutdown) while a batch is in hand; bounded exit; restart."""
        pid, _ = self._catch_batch(worker)
        process = self.stack.processes[worker]
        started = time.monotonic()
        process.expected_exit = True
        process.signal(signal.SIGTERM)
        status = process.wait(SIGTERM_EXIT_BOUND_S)
        took = time.monotonic() - started
        if status is None:
            self.errors.append(f"{worker} still running {SIGTERM_EXIT_BOUND_S:.0f} s after SIGTERM")
            process.kill()
        else:
            process.kill()  # reap leftovers of the group, if any
        self.stack.restart(worker)
        return {
            "mid_batch": pid is not None,
            "exit_status": status,
            "exit_s": round(took, 2),
        }

    def duplicate_doorbell(self) -> dict[str, Any]:
        """The same message (same task id, same body) published twice per currency."""
        result = self.stack.run("-c", DUPLICATE_DOORBELL, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-2000:])
        return {}

    # --- webhook deliveries -----------------------------------------------------------------

    def kill_webhooks_mid_delivery(self, down_s: float = 1.0) -> dict[str, Any]:
        """SIGKILL the delivery worker while the receiver is answering one of its attempts
        (claimed, not yet recorded: its lease must run out before the sweep hands it out
        again); restart it."""
        assert self.receiver is not None
        started = time.monotonic()
        while self.receiver.in_flight == 0 and time.monotonic() - started < CATCH_BATCH_S:
            time.sleep(0.002)
        in_flight = self.receiver.in_flight
        self.stack.processes["webhooks"].kill()
        self._restart_later("webhooks", down_s)
        return {"in_flight": in_flight, "waited_s": round(time.monotonic() - started, 2)}

    def receiver_down(self, down_s: float) -> dict[str, Any]:
        """The receiver's port closed for `down_s`: attempts meanwhile are refused and
        retried on the backoff schedule."""
        receiver = self.receiver
        assert receiver is not None
        receiver.stop()

        def start() -> None:
            time.sleep(down_s)
            receiver.start()

        thread = threading.Thread(target=start, name="receiver-up")
        thread.start()
        self._restarts.append(thread)
        return {"down_s": down_s}

    # --- Redis -----------------------------------------------------------------------------

    def redis_flushall(self) -> dict[str, Any]:
        queued = self.stack.redis.command("LLEN", "celery")
        deliveries = self.stack.redis.command("LLEN", "webhooks")
        self.stack.redis.command("FLUSHALL")
        return {"doorbells_dropped": queued, "delivery_messages_dropped": deliveries}

    def redis_restart(self, down_s: float = 2.0) -> dict[str, Any]:
        self.stack.redis.stop()
        time.sleep(down_s)
        self.stack.redis.start()
        return {"down_s": down_s}

    # --- PostgreSQL ------------------------------------------------------------------------

    def terminate_backends(self) -> dict[str, Any]:
        """pg_terminate_backend on every connection of the app's database."""
        with self.stack.pg.connect() as connection:
            rows = connection.execute(
                "SELECT application_name, pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (self.stack.database,),
            ).fetchall()
        return {"terminated": len(rows), "by_app": dict(Counter(row[0] for row in rows))}

    def pg_restart(self, mode: str = "fast", down_s: float = 2.0) -> dict[str, Any]:
        self.stack.pg.stop(mode)
        time.sleep(down_s)
        self.stack.pg.start()
        wait_until(self.stack.pg.running, 60, what="PostgreSQL to be back")
        return {"mode": mode, "down_s": down_s}

"""ops: the command lines every runner shares, run.sh's usage errors, and a supervised
process's stop (SIGTERM, then SIGKILL to its whole group). The stack itself runs in the
chaos suite, the benchmark's smoke test and test_security's `./run.sh <service>` runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ops import services
from ops.supervisor import Process

ROOT = Path(__file__).resolve().parent.parent


def test_each_service_has_one_command_line(monkeypatch) -> None:
    monkeypatch.setenv("FLOWER_PORT", "5999")
    python = sys.executable
    assert services.command("migrate") == [python, "-m", "worker.cli", "migrate"]
    assert services.command("web") == [
        python, "-m", "gunicorn", "--config", "python:web.gunicorn_conf", "web.wsgi:app",
    ]  # fmt: skip
    assert services.command("web", bind="127.0.0.1:1")[-3:] == [
        "--bind", "127.0.0.1:1", "web.wsgi:app",
    ]  # fmt: skip
    assert services.command("worker")[3:] == ["--app", "worker.app", "worker", "--loglevel", "INFO"]
    monkeypatch.setenv("WEBHOOK_CONCURRENCY", "7")
    assert services.command("webhooks")[3:] == [
        "--app", "worker.app", "worker", "--loglevel", "INFO", "--queues", "webhooks",
        "--pool", "threads", "--concurrency", "7", "--hostname", "webhooks@%h",
    ]  # fmt: skip
    assert services.command("beat", schedule=Path("/s"))[5:] == [
        "beat", "--loglevel", "INFO", "--schedule", "/s",
    ]  # fmt: skip
    assert services.command("flower")[5:] == ["flower", "--port=5999"]


@pytest.mark.parametrize(
    ("args", "status"), [(["nonsense"], 2), (["up", "extra"], 2), (["help"], 0)]
)
def test_run_sh_usage(args: list[str], status: int) -> None:
    env = {
        **os.environ,
        "REMIT_USE_SYSTEM_PYTHON": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    result = subprocess.run(
        ["bash", "run.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == status, result.stderr


def test_a_stopped_process_takes_its_group_along(tmp_path: Path) -> None:
    # A parent that ignores SIGTERM and a child of its own: both must go.
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    process = Process("stubborn", [sys.executable, "-c", script], log=tmp_path / "log")
    process.start()
    deadline = time.monotonic() + 20
    while "ready" not in (tmp_path / "log").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [child] = process.tree()
    assert process.stop(timeout=0.5) is False  # it had to be killed
    assert not process.alive()
    assert not psutil.pid_exists(child.pid) or child.status() == psutil.STATUS_ZOMBIE

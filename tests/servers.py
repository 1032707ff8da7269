"""Real servers a test starts on loopback (gunicorn, Flower) and waits for."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = str(Path(sys.executable).parent / "gunicorn")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def environment(**changes: str | None) -> dict[str, str]:
    """This run's environment with some variables changed (None: removed)."""
    env = dict(os.environ)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def gunicorn_command(port: int, workers: int) -> list[str]:
    """The API's command line as ./run.sh web has it, on a loopback port."""
    bind = ["--bind", f"127.0.0.1:{port}", "--workers", str(workers)]
    return [GUNICORN, "--config", "python:web.gunicorn_conf", *bind, "web.wsgi:app"]


@contextlib.contextmanager
def serving(
    command: Sequence[str], env: dict[str, str], port: int, probe: str, stop_timeout: float = 40
) -> Iterator[str]:
    """Runs `command` until the block ends; yields its URL once `probe` answers."""
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"{command[0]} exited"
            try:
                requests.get(url + probe, timeout=1)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, f"{command[0]} did not start"
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=stop_timeout)

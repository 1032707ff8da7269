"""Debian packages the project's tools need but its venv cannot hold (wrk, and later
pgbouncer, iptables): installed by the tool that needs them, never by hand."""

from __future__ import annotations

import os
import shutil
import subprocess

from ops import say


def ensure(program: str, package: str | None = None) -> bool:
    """True once `program` is on PATH, after `apt-get install`ing its package as root
    when it was missing; False where that is not possible (not root, no apt, offline)."""
    if shutil.which(program):
        return True
    apt_get = shutil.which("apt-get")
    if apt_get is None or os.geteuid() != 0:
        return False
    package = package or program
    say(f"installing Debian's {package} (apt-get) for {program}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")

    def apt(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [apt_get, *args], env=env, capture_output=True, text=True, check=False
        )

    done = apt("install", "-y", "-q", "--no-install-recommends", package)
    if done.returncode != 0 and apt("update", "-q").returncode == 0:
        # A fresh machine's package lists may be missing or stale.
        done = apt("install", "-y", "-q", "--no-install-recommends", package)
    if shutil.which(program):
        return True
    say(f"could not install {package}: {(done.stderr or done.stdout).strip()[-300:]}")
    return False

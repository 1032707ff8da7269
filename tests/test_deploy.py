"""The deployable stack, checked without a Docker engine: the compose file and Dockerfile
are parsed, every service runs a real `./run.sh` command, and every image is pinned."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
APP_SERVICES = ("migrate", "web", "worker", "webhooks", "beat", "flower")


def _run_sh_commands() -> set[str]:
    help_text = subprocess.run(
        ["bash", str(ROOT / "run.sh"), "help"], capture_output=True, text=True, check=True
    ).stdout
    return set(re.findall(r"^  (\w+)", help_text, re.MULTILINE))


def test_the_stack_has_every_service() -> None:
    assert set(SERVICES) == {"postgres", "redis", *APP_SERVICES}


@pytest.mark.parametrize("name", APP_SERVICES)
def test_each_app_service_runs_the_local_runners_entry_point(name: str) -> None:
    command = SERVICES[name]["command"]
    assert command[0] == "./run.sh"
    assert command[1] == name
    assert name in _run_sh_commands()


def test_images_are_pinned() -> None:
    for name, service in SERVICES.items():
        image = service.get("image", "")
        if name in APP_SERVICES:
            assert service["build"] == "."
        tag = image.rsplit(":", 1)[-1] if ":" in image else ""
        assert re.fullmatch(r"\d+(\.\d+)+(-[a-z0-9]+)?", tag), (name, image)
    base = re.search(r"^FROM (\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert base is not None
    assert re.search(r":\d+\.\d+\.\d+-slim", base.group(1))


def test_services_wait_for_healthy_dependencies_and_restart() -> None:
    for name in ("postgres", "redis"):
        assert "healthcheck" in SERVICES[name]
    for name in ("web", "worker", "webhooks", "beat", "flower"):
        service = SERVICES[name]
        assert service["restart"] in ("unless-stopped", "always")
        assert all("condition" in dependency for dependency in service["depends_on"].values())
    assert SERVICES["migrate"]["restart"] == "no"
    assert SERVICES["web"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_durability_and_secrets_settings() -> None:
    assert "--appendonly" in SERVICES["redis"]["command"]
    assert "yes" in SERVICES["redis"]["command"]
    assert "pgdata:/var/lib/postgresql/data" in SERVICES["postgres"]["volumes"]
    assert "FLOWER_BASIC_AUTH" in SERVICES["flower"]["environment"]
    assert SERVICES["web"]["env_file"] == ".env"
    example = (ROOT / ".env.example").read_text()
    for variable in ("SUPERUSER_PASSWORD", "SECRET_KEY", "FLOWER_USER", "FLOWER_PASSWORD"):
        assert re.search(rf"^{variable}=", example, re.MULTILINE)
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_stop_grace_outlasts_the_workers_shutdown() -> None:
    def seconds(value: str) -> int:
        return int(value.rstrip("s"))

    assert seconds(SERVICES["worker"]["stop_grace_period"]) >= 60
    assert seconds(SERVICES["web"]["stop_grace_period"]) > 30  # gunicorn graceful_timeout


def test_dockerfile_runs_as_non_root_with_a_healthcheck() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER remit$", dockerfile, re.MULTILINE)
    assert "HEALTHCHECK" in dockerfile
    assert "pip install --no-compile -r requirements.txt" in dockerfile


def _requirements(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def test_the_image_installs_the_runtime_only() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    instructions = [line for line in dockerfile.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in instructions if "requirements-dev" in line]
    installs = re.findall(r"pip install[^\n]*", dockerfile)
    assert installs == ["pip install --no-compile -r requirements.txt"]
    # Every service's command goes through ./run.sh and the ops package: both are in it.
    assert re.search(r"^COPY .*\brun\.sh\b", dockerfile, re.MULTILINE)
    assert re.search(r"^COPY .* ops \./ops$", dockerfile, re.MULTILINE)


def test_requirements_are_pinned_and_split() -> None:
    runtime = _requirements("requirements.txt")
    dev = _requirements("requirements-dev.txt")
    assert dev[0] == "-r requirements.txt"
    for line in runtime + dev[1:]:
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[a-z,]+\])?==[0-9][0-9A-Za-z.]*", line), line
    names = {re.split(r"[\[=]", line, maxsplit=1)[0].lower() for line in runtime}
    # The test, bench and lint tools are development's only.
    assert not names & {"pytest", "ruff", "schemathesis", "matplotlib", "hypothesis", "tqdm"}


@pytest.mark.parametrize(
    ("environment", "expected"),
    [({"WEB_THREADS": "7"}, "7"), ({"WEB_THREADS": "7", "DB_POOL_SIZE": "3"}, "3")],
    ids=["one per thread", "explicit size wins"],
)
def test_gunicorn_keeps_a_pooled_connection_per_thread(
    environment: dict[str, str], expected: str, tmp_path: Path
) -> None:
    # A smaller pool closes and reopens connections under load (a backend per burst).
    script = "import os, web.gunicorn_conf; print(os.environ['DB_POOL_SIZE'])"
    env = {k: v for k, v in os.environ.items() if k not in {"DB_POOL_SIZE", "WEB_THREADS"}}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        # Its own metrics folder, or the config makes a temporary one and leaves it.
        env={**env, **environment, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == expected

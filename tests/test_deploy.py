"""The deployable stack, checked without a Docker engine or a cluster: the compose file and
Dockerfile are parsed, every service runs a real `./run.sh` command, and every image is
pinned; deploy/kubernetes/ is validated offline against the Kubernetes schemas and runs
what compose runs, with the same settings."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
APP_SERVICES = ("migrate", "pgbouncer", "web", "worker", "webhooks", "beat", "flower")
# What reaches PostgreSQL through PgBouncer; migrate and PgBouncer itself go direct.
POOLED = ("web", "worker", "webhooks", "beat", "flower")


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
    for name in ("pgbouncer", "web", "worker", "webhooks", "beat", "flower"):
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


def test_every_service_has_resource_limits() -> None:
    for name, service in SERVICES.items():
        limits = service["deploy"]["resources"]["limits"]
        assert _compose_cpu(limits["cpus"]) > 0, name
        assert _compose_memory(limits["memory"]) >= 64 * 2**20, name


def test_web_and_workers_reach_postgresql_through_pgbouncer() -> None:
    for name in POOLED:
        environment = SERVICES[name]["environment"]
        assert "@pgbouncer:6432/" in environment["DATABASE_URL"], name
        assert environment["DATABASE_POOLER"] == "pgbouncer", name
        # Flower starts after a healthy worker, which waits for PgBouncer.
        waits_for = "worker" if name == "flower" else "pgbouncer"
        assert SERVICES[name]["depends_on"][waits_for]["condition"] == "service_healthy"
    # Migrations and the pooler itself talk to PostgreSQL: no pooler in between.
    for name in ("migrate", "pgbouncer"):
        environment = SERVICES[name]["environment"]
        assert "@postgres:5432/" in environment["DATABASE_URL"], name
        assert "DATABASE_POOLER" not in environment, name
    pgbouncer = SERVICES["pgbouncer"]
    assert "env_file" not in pgbouncer  # the database password only, not the app's secrets
    assert pgbouncer["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert pgbouncer["stop_signal"] == "SIGINT"  # PgBouncer's safe shutdown


# --- Kubernetes (deploy/kubernetes/): kustomize base and an example overlay ---------------

KUBERNETES = ROOT / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
OVERLAY = KUBERNETES / "overlays" / "example"
# The oldest Kubernetes the validator ships schemas for, and its newest.
KUBERNETES_VERSIONS = ("1.25", kubernetes_validate.utils.latest_version())
# The release's first step (docs/operations.md): everything the migration Job needs and the
# Job itself, none of the processes that need the migrated schema.
BEFORE_ROLLOUT = "app.kubernetes.io/component notin (pgbouncer,web,worker,webhooks,beat,flower)"
# compose service -> Kubernetes workload running the same command.
WORKLOADS = {name: ("Job" if name == "migrate" else "Deployment") for name in APP_SERVICES}


def _kustomization(folder: Path) -> dict[str, Any]:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def _documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def _base_documents() -> list[dict[str, Any]]:
    return [
        document
        for resource in _kustomization(BASE)["resources"]
        for document in _documents(BASE / resource)
    ]


BASE_DOCUMENTS = _base_documents()


def _resource(kind: str, name: str) -> dict[str, Any]:
    (found,) = [
        document
        for document in BASE_DOCUMENTS
        if document["kind"] == kind and document["metadata"]["name"] == name
    ]
    return found


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def _container(service: str) -> dict[str, Any]:
    name = "remit-migrate" if service == "migrate" else service
    (container,) = _pod_spec(_resource(WORKLOADS[service], name))["containers"]
    return container


def _pod_templates() -> list[dict[str, Any]]:
    return [d for d in BASE_DOCUMENTS if d["kind"] in ("Deployment", "Job")]


def _seconds(value: str) -> int:
    return int(value.rstrip("s"))


def _compose_cpu(value: str | float) -> int:
    return round(float(value) * 1000)


def _match(pattern: str, text: str) -> tuple[str, ...]:
    match = re.fullmatch(pattern, text)
    assert match is not None, (pattern, text)
    return match.groups()


def _compose_memory(value: str) -> int:
    # Docker's units are binary: 512M is 512 MiB.
    number, unit = _match(r"(\d+)([kmg]?)b?", str(value).lower())
    return int(number) * 1024 ** " kmg".index(unit or " ")


def _kubernetes_cpu(value: str | int) -> int:
    text = str(value)
    return int(text[:-1]) if text.endswith("m") else round(float(text) * 1000)


def _kubernetes_memory(value: str) -> int:
    number, unit = _match(r"(\d+)(Ki|Mi|Gi)", value)
    return int(number) * 1024 ** ("KiMiGi".index(unit) // 2 + 1)


def _env_example() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_the_kustomizations_list_every_manifest() -> None:
    base = _kustomization(BASE)
    files = {path.name for path in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(base["resources"]) == sorted(files)
    assert [image["name"] for image in base["images"]] == ["remit"]
    overlay = _kustomization(OVERLAY)
    listed = {*overlay["resources"], *(patch["path"] for patch in overlay["patches"])}
    files = {path.name for path in OVERLAY.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == {"../../base", *files}
    # The real secrets come from a git-ignored file beside its example.
    (generator,) = overlay["secretGenerator"]
    assert generator["envs"] == ["secrets.env"]
    assert (OVERLAY / ".gitignore").read_text().split() == ["secrets.env"]
    example = (OVERLAY / "secrets.env.example").read_text()
    assert set(re.findall(r"^(\w+)=", example, re.MULTILINE)) == set(
        _resource("Secret", "remit-secrets")["stringData"]
    )


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_manifests_are_valid_kubernetes(version: str) -> None:
    # Strict: a misspelt or misplaced field fails too. The schemas ship with the package.
    documents = [*BASE_DOCUMENTS, *_documents(OVERLAY / "namespace.yaml")]
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)
    assert len(BASE_DOCUMENTS) >= 15


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its kustomize) not installed")
@pytest.mark.parametrize("folder", ["base", "overlays/example"])
def test_kustomize_renders_valid_kubernetes(folder: str, tmp_path: Path) -> None:
    # The overlay needs its secrets file: build a copy that has the example's.
    copy = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, copy)
    shutil.copy(
        copy / "overlays/example/secrets.env.example", copy / "overlays/example/secrets.env"
    )
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(copy / folder)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    documents = [document for document in yaml.safe_load_all(rendered) if document]
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSIONS[-1], strict=True)
        assert document["metadata"]["labels"]["app.kubernetes.io/part-of"] == "remit"
    images = {
        container["image"]
        for document in documents
        if document["kind"] in ("Deployment", "Job")
        for container in _pod_spec(document)["containers"]
    }
    if folder == "base":
        assert len(documents) == len(BASE_DOCUMENTS)
        assert images == {SERVICES["web"]["image"]}
    else:
        assert images == {"registry.example.com/remit:0.1.0"}
        assert {d["metadata"].get("namespace") for d in documents if d["kind"] != "Namespace"} == {
            "remit"
        }


def test_every_pod_is_non_root_read_only_and_bounded() -> None:
    for workload in _pod_templates():
        pod = _pod_spec(workload)
        name = workload["metadata"]["name"]
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True, name
        assert security["runAsUser"] > 0, name
        assert security["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        empty_dirs = {volume["name"] for volume in pod["volumes"] if "emptyDir" in volume}
        assert empty_dirs == {volume["name"] for volume in pod["volumes"]}, name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            resources = container["resources"]
            assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
            for kind, parse in (("cpu", _kubernetes_cpu), ("memory", _kubernetes_memory)):
                assert parse(resources["requests"][kind]) <= parse(resources["limits"][kind])
            # Where a process must write: an emptyDir, /tmp at least (tempfile's folder).
            mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
            assert mounts["/tmp"] in empty_dirs, name  # noqa: S108 - the pod's, not ours
            assert set(mounts.values()) <= empty_dirs, name


def test_web_is_probed_on_health_autoscaled_and_budgeted() -> None:
    web = _resource("Deployment", "web")
    labels = web["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in web["spec"]  # the autoscaler's
    (container,) = _pod_spec(web)["containers"]
    (port,) = container["ports"]
    assert port["containerPort"] == int(SERVICES["web"]["environment"]["PORT"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": port["name"]}
    # Liveness does not depend on the database: an outage must not restart every pod.
    assert container["livenessProbe"]["tcpSocket"] == {"port": port["name"]}
    # gunicorn's graceful_timeout (30 s) fits after the preStop pause.
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert _pod_spec(web)["terminationGracePeriodSeconds"] >= 5 + 30
    service = _resource("Service", "web")
    assert service["spec"]["selector"] == labels
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    autoscaler = _resource("HorizontalPodAutoscaler", "web")
    assert autoscaler["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "web",
    }
    assert 2 <= autoscaler["spec"]["minReplicas"] < autoscaler["spec"]["maxReplicas"]
    budget = _resource("PodDisruptionBudget", "web")
    assert budget["spec"]["selector"]["matchLabels"] == labels
    assert budget["spec"]["maxUnavailable"] == 1
    targets = [
        d["spec"]["scaleTargetRef"]["name"]
        for d in BASE_DOCUMENTS
        if d["kind"] == "HorizontalPodAutoscaler"
    ]
    assert targets == ["web"]


@pytest.mark.parametrize("name", ["worker", "webhooks"])
def test_workers_are_probed_by_the_compose_celery_ping(name: str) -> None:
    healthcheck = SERVICES[name]["healthcheck"]
    kind, command = healthcheck["test"]
    assert kind == "CMD-SHELL"
    probe = _container(name)["livenessProbe"]
    # Compose writes $$ for a literal $: the shell expands $HOSTNAME (the pod's name, which
    # is also Celery's node name there) in both.
    assert probe["exec"]["command"] == ["sh", "-c", command.replace("$$", "$")]
    assert probe["periodSeconds"] == _seconds(healthcheck["interval"])
    assert probe["timeoutSeconds"] == _seconds(healthcheck["timeout"])
    assert probe["failureThreshold"] == healthcheck["retries"]


def test_beat_runs_exactly_once_and_keeps_its_schedule_in_an_emptydir() -> None:
    beat = _resource("Deployment", "beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}
    (container,) = _pod_spec(beat)["containers"]
    assert "/app/.run" in {mount["mountPath"] for mount in container["volumeMounts"]}


def test_the_migration_job_runs_first_and_goes_direct() -> None:
    job = _resource("Job", "remit-migrate")
    assert _pod_spec(job)["restartPolicy"] == "Never"
    environment = {entry["name"]: entry.get("value") for entry in _container("migrate")["env"]}
    assert "@postgres:5432/" in environment["DATABASE_URL"]
    assert "DATABASE_POOLER" not in environment
    # The documented first step selects the Job and what it needs, and no process.
    operations = (ROOT / "docs" / "operations.md").read_text()
    assert BEFORE_ROLLOUT in operations
    (names,) = _match(r".* notin \((.*)\)", BEFORE_ROLLOUT)
    excluded = set(names.split(","))
    first = {
        (d["kind"], d["metadata"]["name"])
        for d in BASE_DOCUMENTS
        if d["metadata"]["labels"].get("app.kubernetes.io/component") not in excluded
    }
    assert first == {
        ("ConfigMap", "remit-config"),
        ("Secret", "remit-secrets"),
        ("Service", "postgres"),
        ("Service", "redis"),
        ("Job", "remit-migrate"),
    }
    workloads = {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in _pod_templates()}
    assert workloads - {"migrate"} == excluded


def test_the_config_and_secret_hold_the_env_files_settings() -> None:
    example = _env_example()
    config = _resource("ConfigMap", "remit-config")["data"]
    secret = _resource("Secret", "remit-secrets")["stringData"]
    assert not set(config) & set(secret)
    assert set(config) | set(secret) == set(example)
    assert config == {name: example[name] for name in config}
    assert not [name for name in config if re.search("PASSWORD|SECRET", name)]


def _compose_settings(name: str) -> set[str]:
    """What a compose service's processes see: its env file, its environment, and what its
    environment's values take from the env file (`${POSTGRES_PASSWORD}`)."""
    service = SERVICES[name]
    environment = service.get("environment", {})
    names = set(environment)
    if "env_file" in service:
        names |= set(_env_example())
    for value in environment.values():
        names |= set(re.findall(r"\$\{(\w+)\}", str(value)))
    return names


def _kubernetes_settings(container: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            names |= set(_resource("ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            names |= set(_resource("Secret", source["secretRef"]["name"])["stringData"])
    return names | {entry["name"] for entry in container["env"]}


@pytest.mark.parametrize("name", APP_SERVICES)
def test_compose_and_kubernetes_run_the_same_commands_and_settings(name: str) -> None:
    service = SERVICES[name]
    container = _container(name)
    assert container["command"] == service["command"]
    assert container["image"] == service["image"]
    assert _kubernetes_settings(container) == _compose_settings(name)
    assert ("envFrom" in container) == ("env_file" in service)
    # The same values, compose's ${X} being Kubernetes' $(X)...
    values = {entry["name"]: entry.get("value") for entry in container["env"]}
    for variable, value in service["environment"].items():
        assert values[variable] == re.sub(r"\$\{(\w+)\}", r"$(\1)", str(value)), variable
    # ...which Kubernetes expands only from variables defined before it.
    defined = _kubernetes_settings({**container, "env": []})
    for entry in container["env"]:
        assert set(re.findall(r"\$\((\w+)\)", entry.get("value", ""))) <= defined, entry
        defined.add(entry["name"])
    # The same limits, and as long to stop.
    limits = container["resources"]["limits"]
    compose_limits = service["deploy"]["resources"]["limits"]
    assert _kubernetes_cpu(limits["cpu"]) == _compose_cpu(compose_limits["cpus"])
    assert _kubernetes_memory(limits["memory"]) == _compose_memory(compose_limits["memory"])
    if "stop_grace_period" in service:
        grace = _pod_spec(_resource("Deployment", name))["terminationGracePeriodSeconds"]
        assert grace == _seconds(service["stop_grace_period"])

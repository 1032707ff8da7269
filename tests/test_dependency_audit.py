"""Dependency audit: pip-audit over exactly what requirements.txt installs.

requirements.txt pins the direct dependencies; what they pull in is resolved here from the
installed environment (the one the suite runs in), so the audit covers the whole tree at
the versions really used, with no resolver and no download.

The vulnerability data comes from PyPI's JSON API (pip-audit's default source). Where that
cannot be reached (a machine that reaches only the package index itself, as the development
machines do), the audit is skipped with the reason printed in pytest's summary: CI does not
depend on the network, and the skip says plainly that nothing was checked.

Known vulnerabilities that are accepted are listed in ACCEPTED with the reason; any other
one fails the suite. The list is empty: none is accepted.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent

# Vulnerability id (PYSEC-..., GHSA-..., CVE-...) -> why it does not apply or cannot be
# fixed yet. Write the reason so that a reviewer can check it; remove the entry with the fix.
ACCEPTED: dict[str, str] = {}

# pip-audit's own words when its source does not answer for a package.
_UNREACHABLE = re.compile(r"ConnectionError|NameResolution|Max retries|timed out", re.IGNORECASE)


def _direct_requirements() -> list[Requirement]:
    requirements = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        specification = line.split("#", 1)[0].strip()
        if specification:
            requirements.append(Requirement(specification))
    return requirements


def pinned_closure() -> dict[str, str]:
    """requirements.txt and everything it needs, as installed: canonical name -> version."""
    pins: dict[str, str] = {}
    pending = [
        (requirement, frozenset(requirement.extras)) for requirement in _direct_requirements()
    ]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        requirement, extras = pending.pop()
        name = canonicalize_name(requirement.name)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        distribution = metadata.distribution(name)
        pins[name] = distribution.version
        for raw in distribution.requires or []:
            needed = Requirement(raw)
            environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
            if needed.marker is None or any(needed.marker.evaluate(env) for env in environments):
                pending.append((needed, frozenset(needed.extras)))
    return pins


def test_the_environment_is_what_requirements_txt_pins() -> None:
    # Otherwise the audit below would judge other versions than the ones deployed.
    for requirement in _direct_requirements():
        [pinned] = [spec.version for spec in requirement.specifier if spec.operator == "=="]
        assert metadata.version(requirement.name) == pinned, requirement.name


def _audit(pins: dict[str, str], folder: Path) -> dict:
    """pip-audit's JSON report on these exact versions; skips the test when offline."""
    locked = folder / "requirements-locked.txt"
    locked.write_text("".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip_audit",
            "--requirement",
            str(locked),
            "--no-deps",
            "--disable-pip",
            "--format",
            "json",
            "--progress-spinner",
            "off",
            "--cache-dir",
            str(folder / "cache"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0 and _UNREACHABLE.search(result.stderr):
        pytest.skip(
            "dependency audit skipped: pip-audit's vulnerability source (PyPI's JSON API) "
            "cannot be reached from this machine; nothing was checked"
        )
    # pip-audit exits 1 when it found vulnerabilities; the JSON says which.
    assert result.stdout.strip(), result.stderr
    report = json.loads(result.stdout)
    dependencies = report["dependencies"]
    if dependencies and all("skip_reason" in dep for dep in dependencies):
        pytest.skip(
            "dependency audit skipped: PyPI's JSON API, pip-audit's vulnerability source, "
            f"does not answer from this machine ({dependencies[0]['skip_reason']}); "
            "nothing was checked"
        )
    return report


def test_pinned_requirements_have_no_known_vulnerabilities(tmp_path: Path) -> None:
    pins = pinned_closure()
    # One package first: offline, that is enough to know, and quick.
    probe = min(pins)
    _audit({probe: pins[probe]}, tmp_path)
    report = _audit(pins, tmp_path)
    skipped = [dep for dep in report["dependencies"] if "skip_reason" in dep]
    assert not skipped, f"some packages could not be audited: {skipped}"
    assert len(report["dependencies"]) == len(pins)
    found = [
        f"{dep['name']} {dep['version']}: {vuln['id']} (fixed in {vuln.get('fix_versions')})"
        for dep in report["dependencies"]
        for vuln in dep["vulns"]
        if not {vuln["id"], *vuln.get("aliases", [])} & ACCEPTED.keys()
    ]
    assert not found, "known vulnerabilities:\n" + "\n".join(found)

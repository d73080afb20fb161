"""What the image installs: the runtime pins (no test tool), the project as a wheel, pip check.

requirements.txt (runtime) and requirements-dev.txt (runtime + test) are generated from
pyproject.toml by scripts/compile_requirements.sh; these tests read the files, offline.
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
# Test tools that Airflow itself requires, so the runtime set holds them anyway.
NEEDED_AT_RUNTIME = {"psutil"}


def pins(name: str) -> dict[str, str]:
    """name -> version of every requirement line of a requirements file (all must be pinned)."""
    found = {}
    for line in (REPO / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        [spec] = req.specifier
        assert spec.operator == "==", f"{name}: {line} is not pinned to one version"
        found[canonicalize_name(req.name)] = spec.version
    return found


def via(name: str, package: str) -> str:
    """The `# via` annotation lines under a package's pin."""
    lines = (REPO / name).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if canonicalize_name(line.split("==")[0]) == package)
    after = []
    for line in lines[start + 1:]:
        if not line.startswith("    #"):
            break
        after.append(line)
    return "\n".join(after)


def names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def test_the_runtime_set_holds_no_test_tool():
    runtime = pins("requirements.txt")
    test_tools = names(EXTRAS["test"]) - NEEDED_AT_RUNTIME
    assert test_tools and not test_tools & runtime.keys(), sorted(test_tools & runtime.keys())
    # nor what only the test tools pull in
    assert not {"pytest", "pytest-timeout", "playwright", "aiosmtpd", "veevatools", "pip-audit", "uv",
                "iniconfig", "pip-api", "cyclonedx-python-lib"} & runtime.keys()
    for tool in NEEDED_AT_RUNTIME:  # there because Airflow requires it, not because of the tests
        assert "apache-airflow-core" in via("requirements.txt", tool), tool


def test_the_dev_set_is_the_runtime_set_plus_the_test_tools():
    runtime, dev = pins("requirements.txt"), pins("requirements-dev.txt")
    assert {name: dev.get(name) for name in runtime} == runtime  # same versions: one environment
    assert names(EXTRAS["test"]) <= dev.keys()
    declared = names(PYPROJECT["project"]["dependencies"] + EXTRAS["deploy"])
    assert declared <= runtime.keys(), sorted(declared - runtime.keys())


def test_both_sets_name_the_command_that_generates_them():
    for name in ("requirements.txt", "requirements-dev.txt"):
        assert "bash scripts/compile_requirements.sh" in (REPO / name).read_text().split("\n", 3)[1], name
    script = (REPO / "scripts" / "compile_requirements.sh").read_text()
    assert "--extra deploy -" in script and "--extra deploy --extra test -c requirements.txt" in script


def test_dockerfile_installs_the_runtime_set_and_the_wheel_and_runs_pip_check():
    dockerfile = (REPO / "Dockerfile").read_text()
    base_images = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("FROM ")]
    assert set(base_images) == {"apache/airflow:3.3.2-python3.11"}  # the project requires Python 3.11
    runs = " ".join(re.findall(r"^RUN (.+?)(?<!\\)$", dockerfile.replace("\\\n", " "), flags=re.M))
    assert "-r /opt/clinical-crm/requirements.txt" in runs and "requirements-dev" not in dockerfile
    assert "pip install --no-cache-dir --no-deps /tmp/wheels/*.whl" in runs
    assert " -e " not in runs and "--editable" not in runs
    assert runs.count("pip check") >= 2  # after the pins, and after the project


def test_every_file_the_dockerfile_copies_exists():
    dockerfile = (REPO / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:  # --from: another stage's files
            sources = [part for part in line.split()[1:-1] if not part.startswith("--")]
            for source in sources:
                assert (REPO / source).exists(), f"Dockerfile copies {source}, which is missing"
    assert (REPO / "scripts" / "airflow_init.sh").exists()

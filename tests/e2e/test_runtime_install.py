"""The container's install, replayed without Docker: ``pip install .``, no extras.

The COPY steps and the pip RUN step of deployments/Dockerfile are replayed into a build
folder and a fresh virtual environment. From a folder outside the repository (so the
installed package is imported, never the source tree) every service and the seed job are
imported, the seed job loads the sample catalog, and the four services start against the
local servers, pass their health checks and exit 0 on SIGTERM. A module the services import
at run time that is only in a dev extra fails here, as it would in the image.

The pip cache is reused (the Dockerfile's ``--no-cache-dir`` is dropped): with a warm cache
the install takes about 30 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import MONGODB_URL
from tests.e2e.conftest import SERVICES, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deployments" / "Dockerfile"
# What the copied folders hold here that .dockerignore keeps out of the build context.
NOT_IN_CONTEXT = shutil.ignore_patterns(
    "__pycache__", "*.py[cod]", "*_pb2*.py", "*_pb2*.pyi", "*.egg-info"
)
IMPORTS = (
    "api_gateway.app",
    "ingestion_service.app",
    "billing_service.app",
    "analytics_service.app",
    "scripts.seed",
)
INSTALL_TIMEOUT_S = 420
SEED_TIMEOUT_S = 60


@dataclass(frozen=True)
class Install:
    """A virtual environment holding the project as the image installs it."""

    venv: Path
    context: Path  # the build folder: the Dockerfile's WORKDIR
    outside: Path  # an empty folder to run from, outside the repository and the context

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def env(self) -> dict[str, str]:
        """This environment first on PATH; nothing on PYTHONPATH to reach the source tree."""
        env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.venv)
        return env


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """The Dockerfile's (INSTRUCTION, arguments) pairs, continued lines joined."""
    pairs = []
    for line in re.sub(r"\\\n", " ", dockerfile.read_text()).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            pairs.append((keyword.upper(), arguments.strip()))
    return pairs


def copy_into_context(arguments: str, context: Path) -> None:
    """One ``COPY src... dest`` (dest relative to WORKDIR), as docker copies it."""
    words = shlex.split(arguments)
    assert not [w for w in words if w.startswith("--")], f"COPY flags not replayed: {arguments}"
    *sources, target = words
    destination = context / target
    for source in sources:
        path = ROOT / source
        if path.is_dir():
            shutil.copytree(path, destination, ignore=NOT_IN_CONTEXT, dirs_exist_ok=True)
        else:
            file = destination / path.name if target.endswith("/") else destination
            file.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, file)


def run(command: list[str], install: Install, cwd: Path, timeout_s: float) -> str:
    """Run ``command`` with the environment's PATH; fail with its output unless it exits 0."""
    result = subprocess.run(
        command,
        cwd=cwd,
        env=install.env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{shlex.join(command)} exited {result.returncode}\n{output}"
    return result.stdout


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> Install:
    """Replay the Dockerfile's COPY and pip steps into a fresh virtual environment."""
    root = tmp_path_factory.mktemp("runtime-install")
    install = Install(root / "venv", root / "app", root / "outside")
    assert not root.is_relative_to(ROOT), f"{root}: run from outside the repository"
    install.context.mkdir()
    install.outside.mkdir()
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(install.venv)], check=True, timeout=120)
    pip_steps = 0
    for keyword, arguments in instructions(DOCKERFILE):
        if keyword == "COPY":
            copy_into_context(arguments, install.context)
        elif keyword == "RUN" and "pip install" in arguments:
            # The image keeps no pip cache; the test reuses it to stay quick.
            command = arguments.replace("--no-cache-dir", "")
            run(["/bin/sh", "-c", command], install, install.context, INSTALL_TIMEOUT_S)
            pip_steps += 1
    assert pip_steps == 1, f"expected one RUN step with pip install in {DOCKERFILE}"
    print(f"venv and the Dockerfile's install step: {time.monotonic() - started:.1f} s")
    return install


def test_every_service_and_the_seed_job_import_from_the_install(install: Install) -> None:
    code = (
        "import importlib, json, sys\n"
        "print(json.dumps({m: importlib.import_module(m).__file__ for m in sys.argv[1:]}))"
    )
    stdout = run([str(install.python), "-c", code, *IMPORTS], install, install.outside, 120)
    files = json.loads(stdout)
    assert set(files) == set(IMPORTS)
    for module, file in files.items():
        assert Path(file).is_relative_to(install.venv), f"{module} imported from {file}"


async def test_the_seed_job_and_the_services_run_from_the_install(
    install: Install, tmp_path: Path
) -> None:
    stack = Stack(
        prefix=f"rt{uuid.uuid4().hex[:8]}-",
        log_dir=tmp_path,
        python=str(install.python),
        cwd=install.outside,
        extra_env={"PYTHONPATH": ""},  # empty is unset: the source tree stays out of reach
    )
    try:
        catalog = install.context / "deployments" / "tariffs.yaml"  # copied by the Dockerfile
        seed = await asyncio.create_subprocess_exec(
            str(install.python),
            *("-m", "scripts.seed", "--if-empty", str(catalog)),
            cwd=install.outside,
            env={**install.env(), "MONGODB_URL": MONGODB_URL, "MONGODB_DATABASE": stack.database},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(seed.communicate(), SEED_TIMEOUT_S)
        assert seed.returncode == 0, output.decode()
        assert output.decode().startswith(f"loaded {catalog}"), output.decode()

        started = time.monotonic()
        await stack.start()  # until gRPC health (gateway, ingestion, billing) and /metrics pass
        print(f"four services healthy from the install in {time.monotonic() - started:.1f} s")
        for service in reversed(SERVICES):  # the gateway first, as its callers would go
            await stack.stop_service(service, signal.SIGTERM)
            returncode = stack.processes[service].returncode
            assert returncode == 0, f"{service} exited {returncode} on SIGTERM\n{stack.logs()}"
    finally:
        await stack.stop()
        await stack.clean()

"""What can be checked here of the images that cannot be built here.

Triton's image needs NVIDIA's NGC base (nvcr.io, no registry reachable here) and the engine
builder needs NVIDIA's pip index (tensorrt-cu12-libs is a wheel stub on PyPI). So: every
Dockerfile parses; every pinned or ranged wheel resolves from PyPI for the image's Python;
and the commands the images run work outside the image: the operator's Triton command line
on the nvidia-pytriton wheel's tritonserver, the engine builder's and the publisher's
entry points on this checkout. The Python images themselves are built and started by
test_image_builds.py.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
TENSORRT = re.search(r"^ARG TENSORRT_VERSION=(\S+)", (DOCKER / "engine-builder.Dockerfile").read_text(), re.M)[1]
# NGC's tritonserver 25.01-py3 is Ubuntu 24.04 with Python 3.12 (NVIDIA's support matrix);
# the engine builder's base is python:3.11.
TRITON_PYTHON, BUILDER_PYTHON = "3.12", "3.11"


def linux_x86(glibc_minor: int) -> list[str]:
    """pip's --platform tags a glibc 2.<minor> x86-64 system accepts (pip does not expand them)."""
    tags = [f"manylinux_2_{m}_x86_64" for m in range(glibc_minor, 16, -1)] + ["manylinux2014_x86_64"]
    return [arg for tag in tags for arg in ("--platform", tag)]


# glibc of the bases: Debian bookworm 2.36, Ubuntu 24.04 (NGC 25.01) 2.39.
LINUX_X86 = linux_x86(36)
INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "EXPOSE", "CMD", "ENTRYPOINT",
                "LABEL", "COMMENT", "HEALTHCHECK", "STOPSIGNAL", "VOLUME", "SHELL"}
PORT_OFFSET = int(os.environ.get("MOSMEDAI_TEST_PORT_OFFSET", "0"))


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_parses(path: Path) -> None:
    parser = DockerfileParser(path=str(path))
    structure = parser.structure
    text = path.read_text()
    assert not re.search(r"\\\s*\Z", text), f"{path.name}: ends inside a line continuation"
    args: set[str] = set()
    stages: set[str] = set()
    for item in structure:
        instruction, value = item["instruction"], item["value"]
        assert instruction in INSTRUCTIONS, f"{path.name}:{item['startline'] + 1}: unknown instruction {instruction}"
        if instruction == "ARG":
            args.add(value.split("=", 1)[0])
        elif instruction == "FROM":
            image, *rest = value.split()
            for name in re.findall(r"\$\{(\w+)\}", image):
                assert name in args, f"{path.name}: FROM uses ${{{name}}} with no ARG before it"
            if rest:
                assert rest[0].upper() == "AS" and len(rest) == 2, f"{path.name}: FROM {value}"
                stages.add(rest[1])
        elif instruction == "COPY":
            for stage in re.findall(r"--from=(\S+)", value):
                assert stage in stages, f"{path.name}: COPY --from={stage} names no earlier stage"
        elif instruction == "RUN":
            for mount in re.findall(r"--mount=(\S+)", value):
                assert mount == "type=secret,id=pip_cert", f"{path.name}: unexpected mount {mount}"
        elif instruction in ("CMD", "ENTRYPOINT"):
            assert isinstance(json.loads(value), list), f"{path.name}: {instruction} in exec form"
    assert structure[-1]["instruction"] in ("USER", "CMD", "ENTRYPOINT", "EXPOSE")


def pip(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # No find-links or local indexes of this machine: PyPI as an image build sees it.
    return subprocess.run([sys.executable, "-m", "pip", *args, "--isolated", "--no-cache-dir",
                           "--disable-pip-version-check"], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_pinned_tensorrt_resolves_from_pypi(tmp_path: Path) -> None:
    """tensorrt-cu12 (the pin) and its bindings download from PyPI for the builder's Python;
    its libraries are on PyPI as a wheel stub only, which is why the engine builder's pip
    reads NVIDIA's index (docker/engine-builder.Dockerfile)."""
    result = pip("download", "--no-deps", "-d", str(tmp_path), f"tensorrt-cu12=={TENSORRT}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    result = pip("download", "--no-deps", "--only-binary=:all:", "--python-version", BUILDER_PYTHON, *LINUX_X86,
                 "-d", str(tmp_path), f"tensorrt-cu12-bindings=={TENSORRT}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    names = {p.name for p in tmp_path.iterdir()}
    assert f"tensorrt_cu12-{TENSORRT}.tar.gz" in names
    assert any(n.startswith(f"tensorrt_cu12_bindings-{TENSORRT}-cp311-") for n in names), names
    versions = pip("index", "versions", "tensorrt-cu12-libs", cwd=tmp_path)
    assert TENSORRT in versions.stdout.replace(",", " ").split(), versions.stdout
    wheel = pip("download", "--no-deps", "--only-binary=:all:", "--python-version", BUILDER_PYTHON, *LINUX_X86,
                "-d", str(tmp_path), f"tensorrt-cu12-libs=={TENSORRT}", cwd=tmp_path)
    assert wheel.returncode != 0, ("PyPI now has a tensorrt-cu12-libs wheel: the engine builder may drop "
                                   "NVIDIA's extra index (docker/engine-builder.Dockerfile)")
    assert "ARG NVIDIA_PIP_INDEX=https://pypi.nvidia.com" in (DOCKER / "engine-builder.Dockerfile").read_text()


def pip_requirements(path: Path) -> list[str]:
    """The quoted requirement specifiers of the Dockerfile's pip install lines."""
    text = path.read_text().replace("\\\n", " ")
    found = []
    for line in re.findall(r"pip install ([^\n&]+)", text):
        found += [w for w in shlex.split(line) if not w.startswith(("-", "/")) and re.match(r"^[A-Za-z]", w)
                  and not w.startswith("$")]
    return found


@pytest.mark.parametrize(("dockerfile", "python", "glibc"), [("triton.Dockerfile", TRITON_PYTHON, 39),
                                                     ("triton-cpu.Dockerfile", "3.11", 36)])
def test_triton_image_wheels_resolve_from_pypi(dockerfile: str, python: str, glibc: int, tmp_path: Path) -> None:
    """Every requirement the Triton image pip-installs has a wheel on PyPI for its Python
    (resolved with PyPI's metadata, without downloading the wheels)."""
    requirements = pip_requirements(DOCKER / dockerfile)
    assert any(r.startswith("onnxruntime") for r in requirements), requirements
    report = tmp_path / "report.json"
    result = pip("install", "--dry-run", "--no-deps", "--ignore-installed", "--only-binary=:all:",
                 "--python-version", python, *linux_x86(glibc), "--target", str(tmp_path / "t"),
                 "--report", str(report), *requirements, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    resolved = {i["metadata"]["name"].lower(): i["download_info"]["url"] for i in json.loads(report.read_text())["install"]}
    assert len(resolved) == len(requirements), resolved
    assert all(url.startswith("https://files.pythonhosted.org/") for url in resolved.values()), resolved


def test_engine_builder_and_publisher_entry_points_run() -> None:
    """The engine builder's CMD and the publisher's entry point, on this checkout with the
    image's PYTHONPATH layout (sources under services/, the repository beside them)."""
    env = {"PYTHONPATH": str(ROOT / "services"), "PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    for command in ([sys.executable, "-m", "mosmedai.serving.tensorrt_build", "--help"],
                    [sys.executable, str(DOCKER / "model-publisher" / "publish.py"), "--help"]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "usage" in result.stdout.lower()


def test_operators_triton_command_runs_on_the_pytriton_tritonserver(tmp_path: Path) -> None:
    """The Triton command line the operator gives its pods (children.triton_args), run on the
    nvidia-pytriton wheel's tritonserver against this checkout's model repository: Triton
    accepts every flag, loads the pool's tool and becomes ready."""
    sys.path.insert(0, str(ROOT / "operators"))
    from mosmedai.config import Settings
    from mosmedai.local.processes import triton_command
    from mosmedai_operator.children import triton_args
    from mosmedai_operator.config import OperatorConfig
    from mosmedai_operator.spec import GpuPoolSpec
    from mosmedai_operator.testing import gpupool

    ports = {name: port + PORT_OFFSET for name, port in {"http": 28500, "grpc": 28501, "metrics": 28502}.items()}
    spec = GpuPoolSpec.model_validate(gpupool("ru-mow", "mosmedai", tools=["cxr_opacity"])["spec"])
    config = OperatorConfig(triton_model_repository=str(ROOT / "model_repository"), namespaces=["mosmedai"],
                            model_repository_path=ROOT / "model_repository")
    args = triton_args(spec, config)
    assert args[0] == "tritonserver"
    # The pod's ports are Triton's defaults; here they move out of the way of `make up`.
    args = [re.sub(r"^--(http|grpc|metrics)-port=\d+$", lambda m: f"--{m[1]}-port={ports[m[1]]}", a) for a in args]
    settings = Settings(run_dir=tmp_path / "run", enabled_tools=["cxr_opacity"])
    local, env = triton_command(settings)
    # The wheel's binary, and the backend folder NVIDIA's image has at its default path.
    backend = next(a for a in local if a.startswith("--backend-directory="))
    command = [local[0], *args[1:], backend]
    with (tmp_path / "triton.log").open("w") as log:
        triton = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        status = None
        while time.monotonic() < deadline and triton.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/v2/health/ready", timeout=5) as r:
                    status = r.status
                    break
            except (urllib.error.URLError, OSError):
                time.sleep(1)
        assert status == 200, f"Triton not ready (exit {triton.poll()}):\n" + (tmp_path / "triton.log").read_text()[-3000:]
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/v2/models/cxr_opacity/ready", timeout=5) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=5) as r:
            assert b"nv_inference" in r.read()
    finally:
        triton.terminate()
        triton.wait(timeout=60)

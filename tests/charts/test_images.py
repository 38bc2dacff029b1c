"""The Dockerfiles of the images the chart uses (docker/), and the model publisher's logic.

These tests read the Dockerfiles: one per image in values.yaml, base images pinned to an
exact version, a non-root numeric USER, files they COPY exist. test_image_builds.py builds
and starts the Python images (buildah, no daemon); test_nvidia_images.py checks what can be
checked of the NVIDIA-based ones.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
VALUES = yaml.safe_load((ROOT / "charts" / "mosmedai" / "values.yaml").read_text())
# values.yaml image key -> Dockerfile
DOCKERFILES = {"gateway": "gateway.Dockerfile", "operator": "operator.Dockerfile",
               "modelPublisher": "model-publisher.Dockerfile", "triton": "triton.Dockerfile",
               "engineBuilder": "engine-builder.Dockerfile"}


def test_every_chart_image_has_a_dockerfile() -> None:
    assert set(VALUES["images"]) == set(DOCKERFILES)
    for name in DOCKERFILES.values():
        assert (DOCKER / name).is_file(), name


def base_images(text: str) -> list[str]:
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.MULTILINE))
    stages = set(re.findall(r"^FROM \S+ AS (\w+)", text, re.MULTILINE))
    found = []
    for image in re.findall(r"^FROM (\S+)", text, re.MULTILINE):
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        if image not in stages:
            found.append(image)
    return found


@pytest.mark.parametrize("name", sorted(p.name for p in DOCKER.glob("*.Dockerfile")))
def test_dockerfile_is_pinned_and_non_root(name: str) -> None:
    text = (DOCKER / name).read_text()
    # BuildKit reads <Dockerfile>.dockerignore: without it the whole checkout (.venv, .cache)
    # would be sent as the context.
    ignored = (DOCKER / f"{name}.dockerignore").read_text().split()
    assert {".git", ".venv", ".cache"} <= set(ignored), f"{name}.dockerignore"
    for image in base_images(text):
        repository, _, tag = image.partition("@")[0].rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: base image {image} is not pinned"
        assert re.search(r"\d+\.\d+", tag), f"{name}: {image} has no exact version"
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users, f"{name}: no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{name}: the last USER must be a numeric non-root uid"
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), f"{name}: COPY {path} does not exist"


def test_chart_runs_as_the_images_user() -> None:
    uid = VALUES["security"]["runAsUser"]
    for key, name in DOCKERFILES.items():
        if key == "triton":
            continue  # started by the operator as NVIDIA's triton-server user (1000)
        assert f"USER {uid}:{uid}" in (DOCKER / name).read_text(), name


def test_engine_builder_tensorrt_is_the_charts_and_tritons() -> None:
    """Triton refuses a plan of another TensorRT version: the builder's pinned wheel, the
    chart's tensorrt.version (which keys the published prefix) and the Triton base image's
    TensorRT (tritonserver 25.01: 10.8.0.43, NVIDIA's support matrix) must agree."""
    builder = (DOCKER / "engine-builder.Dockerfile").read_text()
    (version,) = re.findall(r"^ARG TENSORRT_VERSION=(\S+)", builder, re.MULTILINE)
    assert version == VALUES["tensorrt"]["version"]
    assert "tritonserver:25.01-py3" in (DOCKER / "triton.Dockerfile").read_text() and version.startswith("10.8.")
    assert "tensorrt-cu12==${TENSORRT_VERSION}" in builder
    # tensorrt_build reads REPO_ROOT/model_repository: REPO_ROOT = /app with sources in /app/services.
    assert "PYTHONPATH=/app/services" in builder and "COPY model_repository /app/model_repository" in builder


@pytest.fixture(scope="module")
def publisher():
    spec = importlib.util.spec_from_file_location("publish", DOCKER / "model-publisher" / "publish.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["publish"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_publisher_plans_the_whole_model_repository(publisher) -> None:
    items = publisher.plan(ROOT / "model_repository", "releases/0.1.0/model_repository/")
    keys = {item.key for item in items}
    for config in (ROOT / "model_repository").glob("*/config.pbtxt"):
        assert f"releases/0.1.0/model_repository/{config.parent.name}/config.pbtxt" in keys
    for onnx in (ROOT / "model_repository").glob("*/1/model.onnx"):
        assert f"releases/0.1.0/model_repository/{onnx.relative_to(ROOT / 'model_repository').as_posix()}" in keys
    assert not [k for k in keys if "__pycache__" in k or k.endswith(".pyc")]


def test_publisher_refuses_a_folder_that_is_not_a_repository(publisher, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="not a Triton model repository"):
        publisher.plan(tmp_path, "x")


def test_publisher_uploads_once_against_an_s3_server(publisher, tmp_path: Path) -> None:
    """Against moto's S3 server (DESIGN.md: moto[server] is the test S3) when installed."""
    pytest.importorskip("moto", reason="moto[server] is not installed (DESIGN.md's test S3)")
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                              aws_access_key_id="test", aws_secret_access_key="test")
        client.create_bucket(Bucket="models")
        items = publisher.plan(ROOT / "model_repository", "model_repository")
        first = publisher.publish(client, "models", "model_repository", items)
        again = publisher.publish(client, "models", "model_repository", items)
        assert first["uploaded"] == len(items) and again == {"uploaded": 0, "unchanged": len(items), "deleted": 0}
    finally:
        server.stop()


def restricted_path(tmp_path: Path, extra: dict[str, str] | None = None) -> str:
    """A PATH with the tools scripts/build-images needs before it picks an engine, and no
    docker or buildah (plus ``extra``: name -> shell script)."""
    import shutil

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "sed", "md5sum", "cut", "id", "cat", "head"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    for name, script in (extra or {}).items():
        (bin_dir / name).write_text(f"#!{shutil.which('bash')}\n{script}\n")
        (bin_dir / name).chmod(0o755)
    return str(bin_dir)


@pytest.mark.parametrize(("extra", "message"), [
    ({}, "neither docker nor buildah is installed: install one (Debian: apt-get install buildah debootstrap"),
    ({"docker": "exit 1"}, "docker is installed but no daemon answers, and buildah is missing"),
])
def test_build_images_says_what_to_install(tmp_path: Path, extra: dict[str, str], message: str) -> None:
    import subprocess

    env = {"PATH": restricted_path(tmp_path, extra), "HOME": str(tmp_path)}
    result = subprocess.run([str(ROOT / "scripts" / "build-images"), "gateway"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert message in result.stderr, result.stderr


def test_build_images_refuses_an_unknown_image(tmp_path: Path) -> None:
    import subprocess

    env = {"PATH": restricted_path(tmp_path, {"buildah": "exit 0"}) + ":/usr/bin:/bin", "ENGINE": "buildah"}
    result = subprocess.run([str(ROOT / "scripts" / "build-images"), "nosuch"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "no docker/nosuch.Dockerfile" in result.stderr, result.stderr

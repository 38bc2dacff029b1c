"""The chart's images, built here without a container daemon and started.

scripts/build-images builds the gateway, operator and model-publisher images with buildah
(root, vfs storage, chroot isolation) on the local Debian stand-in base when the upstream
one cannot be pulled (the base's tarball is cached in .cache/images). Each image then runs
its own command as a buildah container (`buildah run`: the image's numeric user, working
directory and environment; the host's network) against real peers: the gateway against a
local Triton (the nvidia-pytriton wheel's), the operator against kmock's Kubernetes API
emulator, the model publisher against moto's S3 server. Sizes go to reports/images.json.

Needs root and buildah (`make test` installs buildah and debootstrap through `image-deps`).
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VALUES = yaml.safe_load((ROOT / "charts" / "mosmedai" / "values.yaml").read_text())
TAG = yaml.safe_load((ROOT / "charts" / "mosmedai" / "Chart.yaml").read_text())["appVersion"]
IMAGES = ["model-publisher", "operator", "gateway", "triton-cpu"]
# Ports of this module's peers: out of the way of `make up` and the platform fixture.
PORT_OFFSET = int(os.environ.get("MOSMEDAI_TEST_PORT_OFFSET", "0"))
PORTS = {name: port + PORT_OFFSET for name, port in {
    "gateway_http_port": 28000, "gateway_direct_grpc_port": 28400, "serve_proxy_port": 28099,
    "router_metrics_port": 28201, "triton_http_port": 28100, "triton_grpc_port": 28101,
    "triton_metrics_port": 28102, "grpc_port": 29000, "dimse_port": 31112, "s3_port": 28300,
    "prometheus_port": 29090, "operator_health_port": 28081, "triton_cpu_http_port": 28600,
    "triton_cpu_grpc_port": 28601, "triton_cpu_metrics_port": 28602}.items()}
# Generous bounds: a build from an empty cache (base, pip downloads) on 2 cores.
BUILD_TIMEOUT_S = 1500
# Integration: builds images and starts real peers (`make test-unit` leaves them out).
pytestmark = [pytest.mark.timeout(BUILD_TIMEOUT_S + 600), pytest.mark.integration]


def buildah(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["buildah", "--storage-driver", "vfs", *args], capture_output=True, text=True,
                          check=True, **kwargs)


def ref(image: str) -> str:
    return f"localhost/mosmedai/{image}:{TAG}"


@pytest.fixture(scope="module")
def built() -> dict[str, dict[str, Any]]:
    if os.geteuid() != 0 or shutil.which("buildah") is None:
        pytest.skip("building images here needs root and buildah: `make image-deps` (or `make test`) installs it")
    start = time.monotonic()
    result = subprocess.run([str(ROOT / "scripts" / "build-images"), *IMAGES], cwd=ROOT,
                            env={**os.environ, "ENGINE": "buildah", "IMAGE_REGISTRY": "", "IMAGE_TAG": TAG,
                                 # An image built from the same inputs is kept (CI starts empty).
                                 "REUSE": "1"},
                            capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    seconds = round(time.monotonic() - start)
    facts = {}
    for image in IMAGES:
        info = json.loads(buildah("inspect", "--type", "image", ref(image)).stdout)["OCIv1"]
        facts[image] = {"config": info["config"], "size_bytes": image_size(ref(image))}
    report = ROOT / "reports" / "images.json"
    report.parent.mkdir(exist_ok=True)
    report.write_text(json.dumps({"build_seconds": seconds, "base": base_of(result.stderr),
                                  "images": {i: {"ref": ref(i), "size_bytes": f["size_bytes"]} for i, f in facts.items()}},
                                 indent=2) + "\n")
    return facts


def image_size(image: str) -> int:
    """Bytes of the image's layers, uncompressed, as `buildah images` reports them
    (decimal units, three significant digits)."""
    (entry,) = json.loads(buildah("images", "--json", image).stdout)
    number, unit = entry["size"].split()
    return round(float(number) * {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit])


def base_of(log: str) -> str:
    for line in log.splitlines():
        if "using the local stand-in" in line:
            return line.rsplit(" ", 1)[-1]
    return "upstream"


def working_container(image: str) -> str:
    """One buildah working container per image for the whole module: with vfs storage each
    `buildah from` copies the image's root filesystem (about 2 GB for the gateway)."""
    name = f"mosmedai-test-{image}-{os.getpid()}"
    if name not in WORKING:
        subprocess.run(["buildah", "--storage-driver", "vfs", "rm", name], capture_output=True)
        buildah("from", "--pull-never", "--name", name, ref(image))
        WORKING.append(name)
    return name


WORKING: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _remove_working_containers() -> Iterator[None]:
    yield
    for name in WORKING:
        subprocess.run(["buildah", "--storage-driver", "vfs", "rm", name], capture_output=True)
    WORKING.clear()


@contextmanager
def container(image: str, command: list[str], env: dict[str, str] | None = None,
              volumes: dict[Path, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """``command`` running in the image's working container, as the image's user, with the
    image's environment and working directory (`buildah run`), on the host's network."""
    name = working_container(image)
    args = ["buildah", "--storage-driver", "vfs", "run", "--isolation", "chroot"]
    for key, value in (env or {}).items():
        args += ["--env", f"{key}={value}"]
    for host, inside in (volumes or {}).items():
        args += ["--volume", f"{host}:{inside}"]
    # A session of its own: stopping it stops everything the command started (Ray's daemons).
    # Output to a file: a pipe nobody reads would fill and stall a chatty server.
    log = tempfile.NamedTemporaryFile("w+", prefix=f"{image}-", suffix=".log", delete=False)
    process = subprocess.Popen([*args, name, "--", *command], stdout=log, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    LOGS[process.pid] = Path(log.name)
    log.close()
    try:
        yield process
    finally:
        stop_group(process)
        LOGS.pop(process.pid).unlink(missing_ok=True)


LOGS: dict[int, Path] = {}


def stop_group(process: subprocess.Popen[str]) -> None:
    for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def image_command(config: dict[str, Any]) -> list[str]:
    return [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]


def output(process: subprocess.Popen[str]) -> str:
    """What the container printed (stopping it first if it still runs)."""
    if process.poll() is None:
        stop_group(process)
    log = LOGS.get(process.pid)
    return log.read_text(errors="replace")[-4000:] if log else f"(output of {process.args[0]} in its log file)"


def wait_http(url: str, process: subprocess.Popen[str], timeout_s: float, until: int | None = None) -> int:
    """The first HTTP status of ``url`` (or wait for ``until``) while ``process`` runs."""
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args[0]} exited ({process.returncode}) before {url} answered:\n{output(process)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                status = response.status
        except urllib.error.HTTPError as error:
            status = error.code
        except OSError:
            status = None
        if status is not None and (until is None or status == until):
            return status
        time.sleep(1)
    pytest.fail(f"{url} did not answer {until or ''} within {timeout_s} s (last: {status}):\n{output(process)}")


# --- what every image is ------------------------------------------------------------------

def triton_pod(tools: list[str], repository: str) -> dict[str, Any]:
    """The pod spec the operator gives a CPU pool's Triton (its own code, children.deployment)."""
    sys.path.insert(0, str(ROOT / "operators"))
    from mosmedai_operator.children import deployment
    from mosmedai_operator.config import OperatorConfig
    from mosmedai_operator.spec import GpuPoolSpec
    from mosmedai_operator.testing import gpupool

    body = gpupool("ru-mow", "mosmedai", tools=tools)
    body["metadata"]["uid"] = "00000000-0000-0000-0000-000000000001"
    config = OperatorConfig(namespaces=["mosmedai"], triton_model_repository=repository,
                            model_repository_path=ROOT / "model_repository", triton_image=ref("triton-cpu"))
    return deployment(body, GpuPoolSpec.model_validate(body["spec"]), config, 1)["spec"]["template"]["spec"]


@pytest.mark.parametrize("image", IMAGES)
def test_image_runs_as_the_charts_numeric_user(built, image: str) -> None:
    # The chart's pods run as security.runAsUser; the operator's Triton pods as its own uid.
    uid = (triton_pod(["cxr_opacity"], "/models")["securityContext"]["runAsUser"] if image == "triton-cpu"
           else VALUES["security"]["runAsUser"])
    config = built[image]["config"]
    assert config["User"] == f"{uid}:{uid}"
    with container(image, ["sh", "-c", "id -u; id -g; touch /tmp/w && echo tmp-writable; touch /w 2>/dev/null || echo root-not-writable"]) as process:
        assert process.wait(timeout=120) == 0, output(process)
        lines = output(process).split()
    assert lines[:4] == [str(uid), str(uid), "tmp-writable", "root-not-writable"], lines


@pytest.mark.parametrize("image", IMAGES)
def test_image_size_is_reported_and_bounded(built, image: str) -> None:
    report = json.loads((ROOT / "reports" / "images.json").read_text())
    size = report["images"][image]["size_bytes"]
    assert size == built[image]["size_bytes"] > 0
    # The gateway and operator carry the whole project's dependencies (Ray, onnxruntime,
    # opencv, locust...): a bound that catches a stray toolchain or cache in a layer.
    assert size < {"model-publisher": 400, "operator": 3000, "gateway": 3000, "triton-cpu": 1500}[image] * 2**20, size


# --- each image's own command against real peers -------------------------------------------------

def test_model_publisher_image_publishes_to_s3(built) -> None:
    pytest.importorskip("moto", reason="moto[server] is the test S3 (DESIGN.md)")
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=PORTS["s3_port"])
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{PORTS['s3_port']}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="test", aws_secret_access_key="test")
        # moto keeps one in-process store for every server: a bucket of this test's own.
        bucket = "image-test-models"
        client.create_bucket(Bucket=bucket)
        config = built["model-publisher"]["config"]
        command = [*image_command(config), f"--bucket={bucket}", f"--endpoint-url={endpoint}"]
        env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
        with container("model-publisher", command, env) as process:
            assert process.wait(timeout=300) == 0, output(process)
        keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, MaxKeys=1000).get("Contents", [])}
        for config_file in (ROOT / "model_repository").glob("*/config.pbtxt"):
            assert f"model_repository/{config_file.parent.name}/config.pbtxt" in keys
    finally:
        server.stop()


@pytest.fixture
def kmock_options() -> dict[str, Any]:
    from mosmedai_operator.testing import ClusterEmulator

    return {"cls": ClusterEmulator}


@pytest.mark.asyncio
async def test_operator_image_reconciles_a_gpupool_on_kmock(built, kmock, tmp_path: Path) -> None:
    """The operator image's entry point against kmock's emulator (an HTTP server on the
    host's loopback, which the buildah container shares): its health endpoint answers and
    a GpuPool gets its Deployment, made by the operator inside the image."""
    from mosmedai_operator.testing import gpupool, write_kubeconfig

    namespace = "mosmedai"
    kmock.declare_resources()
    # Readable by the image's user, as a mounted Secret would be (pytest's folders are 0700).
    kube = tmp_path / "kube"
    kube.mkdir(mode=0o755)
    kube.chmod(0o755)
    write_kubeconfig(kube / "kubeconfig", str(kmock.url)).chmod(0o644)
    health = PORTS["operator_health_port"]
    env = {"KUBECONFIG": "/kube/kubeconfig", "MOSMEDAI_OPERATOR_NAMESPACES": namespace,
           "MOSMEDAI_OPERATOR_STANDALONE": "true", "MOSMEDAI_OPERATOR_PROMETHEUS_URL": "http://127.0.0.1:9",
           "MOSMEDAI_OPERATOR_HEALTH_PORT": str(health), "MOSMEDAI_OPERATOR_TRITON_IMAGE": "triton:test"}
    resource = "apps/v1/deployments"
    with container("operator", image_command(built["operator"]["config"]), env, {kube: "/kube"}) as process:
        body = gpupool("ru-mow", namespace)
        async with kmock.request("POST", f"/apis/mosmedai.io/v1alpha1/namespaces/{namespace}/gpupools",
                                 json=body) as response:
            assert response.status < 300, await response.text()
        deadline = time.monotonic() + 120
        deployment = None
        while deployment is None and time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"the operator exited ({process.returncode}):\n{output(process)}")
            try:
                obj = kmock.objects[resource, namespace, "ru-mow"]
                deployment = None if obj.deleted else dict(obj.last.raw)
            except KeyError:
                await asyncio.sleep(1)
        assert deployment is not None, f"no Deployment within 120 s:\n{output(process)}"
        status = await asyncio.to_thread(wait_http, f"http://127.0.0.1:{health}/healthz", process, 30)
        assert status == 200
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "triton:test"
    assert deployment["metadata"]["ownerReferences"][0]["kind"] == "GpuPool"


def test_gateway_image_serves_against_a_local_triton(built, tmp_path: Path) -> None:
    """The gateway image's command (`python -m mosmedai.local.processes serve`, as the chart runs it)
    in the local profile against a local Triton (the nvidia-pytriton wheel's, started on the
    host as `make up` does) and the local S3 (moto's server, where the gateway archives):
    /healthz answers, and /readyz once Triton and the tool are ready."""
    pytest.importorskip("moto", reason="moto[server] is the local S3 (DESIGN.md)")
    from moto.server import ThreadedMotoServer

    from mosmedai.config import Settings
    from mosmedai.local.processes import ray_serve_environment, triton_command

    tools = ["cxr_opacity"]  # one tool: Triton loads it in seconds
    settings = Settings(**{k: v for k, v in PORTS.items() if k in Settings.model_fields},
                        bind_host="127.0.0.1", enabled_tools=tools, run_dir=tmp_path / "run", profile="local")
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=settings.s3_port)
    s3.start()
    command, env = triton_command(settings)
    with (tmp_path / "triton.log").open("w") as log:
        triton = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_http(f"http://127.0.0.1:{settings.triton_http_port}/v2/health/ready", triton, 300, until=200)
        # The settings `make up` gives the same command, with the paths inside the image.
        gateway_env = {**settings.as_env(), **ray_serve_environment(settings),
                       "MOSMEDAI_RUN_DIR": "/tmp/run", "MOSMEDAI_MODEL_REPOSITORY": "/tmp/model_repository"}
        gateway_env = {k: v for k, v in gateway_env.items() if k.startswith(("MOSMEDAI_", "RAY_"))}
        base = f"http://127.0.0.1:{settings.gateway_http_port}"
        with container("gateway", image_command(built["gateway"]["config"]), gateway_env) as gateway:
            assert wait_http(f"{base}/healthz", gateway, 300, until=200) == 200
            assert wait_http(f"{base}/readyz", gateway, 120, until=200) == 200
    finally:
        triton.terminate()
        try:
            triton.wait(timeout=30)
        except subprocess.TimeoutExpired:
            triton.kill()
        s3.stop()


def test_triton_cpu_image_runs_the_operators_triton_command(built) -> None:
    """The CPU Triton image with the arguments the operator gives a pool's Triton container
    (children.deployment; ports moved out of the way), on this checkout's model repository
    mounted read-only: the tool loads and Triton becomes ready."""
    import re

    pod = triton_pod(["cxr_opacity"], "/models")
    (spec,) = pod["containers"]
    ports = {"http": PORTS["triton_cpu_http_port"], "grpc": PORTS["triton_cpu_grpc_port"],
             "metrics": PORTS["triton_cpu_metrics_port"]}
    args = [re.sub(r"^--(http|grpc|metrics)-port=\d+$", lambda m: f"--{m[1]}-port={ports[m[1]]}", a) for a in spec["args"]]
    assert args[0] == "tritonserver" and "--model-repository=/models" in args
    with container("triton-cpu", args, volumes={ROOT / "model_repository": "/models:ro"}) as triton:
        base = f"http://127.0.0.1:{ports['http']}"
        assert wait_http(f"{base}/v2/health/ready", triton, 180, until=200) == 200
        assert wait_http(f"{base}/v2/models/cxr_opacity/ready", triton, 10, until=200) == 200

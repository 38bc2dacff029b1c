"""The local platform: `make up` / `make down` on one machine.

Supervised process groups, each started in its own session so that `down` stops
everything a group spawned (Triton's Python stubs, Ray's raylet and workers):

- ``s3``: the local S3-compatible object store (moto's server with a write log under
  ``run_dir/s3``, replayed at start), where accepted studies and their jobs live.
- ``triton`` (pool RU-MOW) and ``triton-RU-TA`` (pool RU-TA): one ``tritonserver`` process
  from the nvidia-pytriton wheel per local pool, CPU only (``mosmedai.serving.pools.local_directory``).
- ``serve``: one Python process that starts a local Ray, runs the Serve application
  (gateway + router) and waits; SIGTERM shuts Serve and Ray down.
- ``grpc``: the gRPC front door (Open Inference Protocol and the study service).
- ``dimse``: the DICOM C-STORE/C-ECHO service; completed series become jobs, results go
  back by C-STORE to each tenant's destination.
- ``prometheus``: the Debian package's Prometheus, scraping the gateway, the router and
  Triton with the chart's rule files loaded (``charts/mosmedai/files/prometheus/rules``).
  Optional: when the binary is missing or does not start, `up` says why and goes on.

Pid files and logs live in ``settings.run_dir`` (``.run/`` by default; logs in
``.run/logs/``). Ray's own logs stay in its session folder (``/tmp/ray/session_latest``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx

from mosmedai.config import REPO_ROOT, Settings
from mosmedai.serving.model_repo import rate_limit_args

GROUPS = ("s3", "triton", "triton-RU-TA", "serve", "dimse", "prometheus")


def local_pools(settings: Settings) -> dict[str, tuple[str, dict[str, int], list[str]]]:
    """Process group -> (pool name, its Triton's ports, the tools it loads), for `make up`."""
    pools = {"triton": ("RU-MOW", {"http": settings.triton_http_port, "grpc": settings.triton_grpc_port,
                                   "metrics": settings.triton_metrics_port}, list(settings.enabled_tools))}
    if settings.second_pool_tools:
        pools["triton-RU-TA"] = ("RU-TA", settings.second_pool_ports, list(settings.second_pool_tools))
    return pools
PROMETHEUS_FILES = REPO_ROOT / "charts" / "mosmedai" / "files" / "prometheus"


# --- Triton from the nvidia-pytriton wheel --------------------------------------------------
def pytriton_root() -> Path:
    import pytriton

    return Path(pytriton.__file__).parent


def triton_backend_dir(settings: Settings) -> Path:
    """A backend folder for the running Python: libtriton_python.so, its utils and the stub.

    The wheel ships one stub per Python version; Triton expects the one it runs next to
    the backend library.
    """
    root = pytriton_root() / "tritonserver"
    target = settings.run_dir / "triton_backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = {
        root / "backends" / "python" / "libtriton_python.so": "libtriton_python.so",
        root / "backends" / "python" / "triton_python_backend_utils.py": "triton_python_backend_utils.py",
        root / "python_backend_stubs" / version / "triton_python_backend_stub": "triton_python_backend_stub",
    }
    for source, name in sources.items():
        if not source.exists():
            raise RuntimeError(f"nvidia-pytriton has no {source.name} for Python {version} ({source})")
        destination = target / name
        if not destination.exists() or destination.stat().st_size != source.stat().st_size:
            shutil.copy2(source, destination)
    return target.parent


def triton_command(settings: Settings, group: str = "triton") -> tuple[list[str], dict[str, str]]:
    """The command line of one local pool's Triton (``group`` of `local_pools`)."""
    _, ports, tools = local_pools(settings)[group]
    binary = pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    libs = Path(sysconfig.get_paths()["purelib"]) / "nvidia_pytriton.libs"
    env = {**os.environ, **settings.as_env()}
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(libs), env.get("LD_LIBRARY_PATH", "")]))
    # The Python stub finds this virtual environment's packages through PATH, and the
    # mosmedai package through PYTHONPATH.
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["PYTHONPATH"] = ":".join(filter(None, [str(REPO_ROOT / "services"), env.get("PYTHONPATH", "")]))
    host = settings.bind_host
    command = [
        str(binary),
        f"--model-repository={settings.model_repository}",
        f"--backend-directory={triton_backend_dir(settings)}",
        f"--http-address={host}", f"--http-port={ports['http']}",
        f"--grpc-address={host}", f"--grpc-port={ports['grpc']}",
        f"--metrics-address={host}", f"--metrics-port={ports['metrics']}",
        "--allow-gpu-metrics=false",
        "--allow-cpu-metrics=true",
        # Explicit control: only the enabled tools (and their steps) are loaded, each at the
        # version it runs (settings.tool_versions: that version's ensemble).
        "--model-control-mode=explicit",
        *(f"--load-model={settings.ensemble_of(tool)}" for tool in tools),
        # Tensors reach Python stubs through shared memory; a 2500x2048 UINT16 image is
        # 10 MB, so start each stub's region at 16 MB and grow in 16 MB steps.
        "--backend-config=python,shm-default-byte-size=16777216",
        "--backend-config=python,shm-growth-byte-size=16777216",
        "--log-verbose=0",
        "--exit-timeout-secs=10",
        # Urgent tools' steps first when executions wait for a core (model_repo.RATE_LIMIT_PRIORITY).
        *rate_limit_args(settings.triton_execution_slots or 2 * (os.cpu_count() or 1)),
    ]
    return command, env


def ray_serve_environment(settings: Settings) -> dict[str, str]:
    """Ray Serve's throughput-optimised mode, read by Ray at import in every process.

    Each gateway replica serves HTTP itself (direct ingress: no proxy actor between the
    client and the gateway, which would copy every 10 MB body once more), handle calls
    to the router go over gRPC, and user code runs on the replica's main event loop.
    The replicas' ports are the gateway port and the ones above it, one per replica, and
    as many again for the new replicas of a restart (`rollout`), which start before the
    old ones stop.
    """
    port = settings.gateway_http_port
    return {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_DEFAULT_HTTP_HOST": settings.bind_host,
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 2 * settings.gateway_replicas),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(settings.gateway_direct_grpc_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(settings.gateway_direct_grpc_port
                                                      + 2 * settings.gateway_replicas),
        # Keep the ports for the next `make up` at once (quarantine exists for HAProxy),
        # and do not hold a stopping replica open long for a load balancer there is not:
        # 2 s, time enough for the replica to see it is draining (mosmedai.ingress.drain) and say so.
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
        # Ray starts its workers at nice 15 (made for batch tasks): the gateway and router
        # replicas would yield the CPU to Triton and to everything else, and a refusal that
        # should take milliseconds waits behind inference for its turn on a core.
        "RAY_worker_niceness": "0",
    }


def serve_command(settings: Settings) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, **settings.as_env()}
    env.update(ray_serve_environment(settings))
    return [sys.executable, "-m", "mosmedai.local.processes", "serve"], env


# --- Prometheus (Debian package) ------------------------------------------------------------
def prometheus_config(settings: Settings) -> dict:
    """prometheus.yml for the local platform: every gateway and router replica, Triton."""
    host = settings.bind_host
    gateways = [f"{host}:{settings.gateway_http_port + i}" for i in range(settings.gateway_replicas)]
    routers = [f"{host}:{settings.router_metrics_port + i}" for i in range(settings.router_replicas)]
    return {
        "global": {
            "scrape_interval": f"{settings.prometheus_scrape_interval_s:g}s",
            "scrape_timeout": f"{min(settings.prometheus_scrape_interval_s, 10.0):g}s",
            "evaluation_interval": f"{settings.prometheus_evaluation_interval_s:g}s",
            "external_labels": {"deployment": "local"},
        },
        "rule_files": [str(PROMETHEUS_FILES / "rules" / "*.yaml")],
        "scrape_configs": [
            {"job_name": "mosmedai-gateway", "static_configs": [{"targets": gateways}]},
            {"job_name": "mosmedai-router", "static_configs": [{"targets": routers}]},
            {"job_name": "triton", "static_configs": [
                {"targets": [f"{host}:{ports['metrics']}"], "labels": {"pool": pool}}
                for pool, ports, _ in local_pools(settings).values()]},
        ],
    }


def prometheus_command(settings: Settings) -> tuple[list[str], dict[str, str]]:
    """The command line, or RuntimeError saying why Prometheus cannot run here."""
    import json

    binary = shutil.which(settings.prometheus_binary)
    if binary is None:
        raise RuntimeError(f"'{settings.prometheus_binary}' is not installed (the Debian package "
                           "`prometheus` provides /usr/bin/prometheus; `make up` installs it where apt-get may run)")
    if not (PROMETHEUS_FILES / "rules").is_dir():
        raise RuntimeError(f"the rule files are missing ({PROMETHEUS_FILES / 'rules'})")
    config = settings.run_dir / "prometheus.yml"
    # JSON is YAML: no YAML writer needed.
    config.write_text(json.dumps(prometheus_config(settings), indent=2) + "\n")
    data = settings.run_dir / "prometheus-data"
    data.mkdir(parents=True, exist_ok=True)
    command = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={data}",
        "--storage.tsdb.retention.time=15d",
        f"--web.listen-address={settings.bind_host}:{settings.prometheus_port}",
        "--log.level=warn",
    ]
    return command, dict(os.environ)


def _start_prometheus(settings: Settings, url: str) -> str | None:
    """Start and wait for Prometheus; the reason it did not start, or None when it runs."""
    if running_pid(settings, "prometheus") is None:
        try:
            command, env = prometheus_command(settings)
        except RuntimeError as error:
            return str(error)
        if not _port_free(settings.bind_host, settings.prometheus_port):
            return (f"port {settings.prometheus_port} is taken by another program; free it or set "
                    "MOSMEDAI_PROMETHEUS_PORT")
        _start(settings, "prometheus", command, env)
    try:
        _wait("Prometheus", lambda: _http_ok(f"{url}/-/ready"), 60.0, settings.log_dir / "prometheus.log",
              (settings, "prometheus"))
    except RuntimeError as error:
        return str(error)
    return None


# --- process groups ---------------------------------------------------------------------
def _pid_file(settings: Settings, group: str) -> Path:
    return settings.run_dir / f"{group}.pid"


def running_pid(settings: Settings, group: str) -> int | None:
    path = _pid_file(settings, group)
    try:
        pid = int(path.read_text().strip())
        try:
            # A group this process started and that died is a zombie until reaped: reap it,
            # or it would count as running.
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None


#: glibc's malloc arenas per process. Its default (8 per core) lets each thread that once held
#: a 10 MiB image keep its own arena's high-water mark: after `make bench` the gRPC front door
#: held 863 MiB and the Serve processes 1,656 MiB. With 2: 693 and 1,388 MiB, the platform
#: 4,737 MiB PSS against 5,321 (same bench, same machine).
MALLOC_ARENAS = "2"
#: Groups whose large buffers go straight back to the system when freed (glibc otherwise raises
#: its mmap threshold to the largest block freed, up to 32 MiB, and keeps such blocks in its
#: heap). Not the Serve processes (whose gateway replica also hosts the gRPC door): the gateway
#: would pay page faults for every image on the measured path.
MMAP_THRESHOLD_GROUPS = {"dimse": "1048576", "s3": "1048576"}


#: CPU priority of each local pool's Triton (nice, and the nice of its session's scheduling
#: group). On one machine the pools share the cores with the gateway and router; in a cluster
#: they are other nodes. Linux shares a busy CPU between sessions (autogroups), so a saturated
#: pool took as much as the whole front door, and a quiet tenant's study waited in the gateway's
#: and router's event loops behind it. At nice 10 the front door's short, latency-bound work
#: goes first and inference takes the rest: at twice the capacity (tests/services/studies/test_overload)
#: the quiet tenant's p50 went from 50 to 34 ms (unloaded: 22), with the same peak.
TRITON_NICE = 10


def _lower_priority(pid: int, nice: int) -> None:
    """Set the nice of a new session's scheduling group (its processes' own nice is set at exec)."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
    except OSError:  # a kernel without autogroups: the processes' own nice is what counts
        pass


def _start(settings: Settings, group: str, command: list[str], env: dict[str, str], nice: int = 0) -> int:
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    env = {"MALLOC_ARENA_MAX": MALLOC_ARENAS,  # a value the caller's environment sets wins
           **({"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD_GROUPS[group]} if group in MMAP_THRESHOLD_GROUPS else {}),
           **env}
    log = open(settings.log_dir / f"{group}.log", "ab")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=env, cwd=REPO_ROOT, start_new_session=True,
                               preexec_fn=(lambda: os.nice(nice)) if nice else None)
    if nice:
        _lower_priority(process.pid, nice)
    _pid_file(settings, group).write_text(f"{process.pid}\n")
    return process.pid


def _session_members(session: int) -> list[int]:
    """Every live process of a session: Ray puts its workers in process groups of their own."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session:
                    members.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return members


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _stop(settings: Settings, group: str, grace_s: float = 20.0) -> bool:
    """SIGTERM the group's leader (it shuts its children down), then SIGKILL whatever of its
    session is left after ``grace_s``."""
    pid = running_pid(settings, group)
    if pid is None:
        _pid_file(settings, group).unlink(missing_ok=True)
        return False
    _signal_all([pid], signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _session_members(pid):
        try:
            # When this process started the group (tests run `up` and `down` in one process),
            # reap the leader: a zombie would count as a member of its session until the
            # grace ends, and would outlive `down`.
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if pid not in _session_members(pid):
            # The leader is gone; give its children a moment, then no more waiting.
            deadline = min(deadline, time.monotonic() + 2.0)
        time.sleep(0.2)
    _signal_all(_session_members(pid), signal.SIGKILL)
    _pid_file(settings, group).unlink(missing_ok=True)
    return True


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def _listening(port: int) -> bool:
    """Whether any socket LISTENs on this TCP port (/proc/net/tcp{,6}: state 0A)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            return True  # cannot tell: assume a listener, as before
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                return True
    return False


def _port_usable(host: str, port: int, timeout_s: float = 75.0) -> bool:
    """Free now, or held only by TIME_WAIT sockets of a server that just stopped (a gateway
    killed with clients' keep-alive connections open leaves them for 60 s, and Ray's
    listener does not set SO_REUSEADDR): then wait for them to expire. False when another
    program listens there."""
    deadline = time.monotonic() + timeout_s
    while not _port_free(host, port):
        if _listening(port) or time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def _wait(what: str, check, timeout_s: float, log_path: Path, pid_group: tuple[Settings, str]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if running_pid(*pid_group) is None:
            raise RuntimeError(f"{what} exited during start-up; see {log_path}")
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready after {timeout_s:.0f} s; see {log_path}")


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _python_module_command(settings: Settings, module: str) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, **settings.as_env()}
    env["PYTHONPATH"] = ":".join(filter(None, [str(REPO_ROOT / "services"), env.get("PYTHONPATH", "")]))
    return [sys.executable, "-m", module], env


def _start_s3(settings: Settings, url: str) -> None:
    from mosmedai.jobs.storage import local_s3_command

    if settings.s3_endpoint_url or running_pid(settings, "s3") is not None:
        return  # an external object store, or ours is running
    if not _port_free(settings.bind_host, settings.s3_port):
        raise RuntimeError(f"port {settings.s3_port} is taken by another program; free it or set MOSMEDAI_S3_PORT")
    settings.s3_log_dir.mkdir(parents=True, exist_ok=True)
    command = local_s3_command(settings.bind_host, settings.s3_port, settings.s3_log_dir)
    _, env = _python_module_command(settings, "mosmedai.jobs.storage")
    _start(settings, "s3", command, env)
    _wait("object store", lambda: _listening(settings.s3_port), 60.0, settings.log_dir / "s3.log", (settings, "s3"))


def endpoints(settings: Settings) -> dict[str, str]:
    host = settings.bind_host
    return {
        "gateway": f"http://{host}:{settings.gateway_http_port}",
        "grpc": f"{host}:{settings.grpc_port}",
        "dimse": f"{host}:{settings.dimse_port}",
        "s3": settings.s3_endpoint,
        "triton_http": f"http://{host}:{settings.triton_http_port}",
        "triton_grpc": f"{host}:{settings.triton_grpc_port}",
        "triton_metrics": f"http://{host}:{settings.triton_metrics_port}/metrics",
        "gateway_metrics": f"http://{host}:{settings.gateway_http_port}/metrics",
        "router_metrics": f"http://{host}:{settings.router_metrics_port}/metrics",
        "prometheus": f"http://{host}:{settings.prometheus_port}",
        **{f"triton_grpc_{pool}": f"{host}:{ports['grpc']}"
           for group, (pool, ports, _) in local_pools(settings).items() if group != "triton"},
    }


#: where Triton's Python backend keeps each model instance's shared memory (one file each)
SHM_REGIONS = "/dev/shm/triton_python_backend_shm_region_*"


def remove_orphaned_shm(min_age_s: float = 5.0) -> int:
    """Unlink the Python backend's shared-memory regions that no live process maps.

    A Triton that exits cleanly unlinks its regions; one that is SIGKILLed (a pool's outage
    in the tests, an OOM kill) leaves them in /dev/shm, which is memory: hundreds of them
    filled 14 GB of a 24 GB machine. A region younger than ``min_age_s`` is left alone (a
    starting Triton creates it a moment before mapping it). Returns how many went."""
    import glob

    mapped: set[str] = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as lines:
                mapped.update(line.split()[-1] for line in lines if "triton_python_backend_shm_region_" in line)
        except OSError:  # the process ended meanwhile, or is not ours to read
            continue
    removed = 0
    for region in glob.glob(SHM_REGIONS):
        try:
            if region not in mapped and time.time() - os.stat(region).st_mtime > min_age_s:
                os.unlink(region)
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def start_tritons(settings: Settings, groups: list[str] | None = None) -> None:
    """Start each local pool's Triton that is not running (all at once: they load in
    parallel), then wait until each is ready. Regions a killed Triton left are removed first."""
    pools = local_pools(settings)
    remove_orphaned_shm()
    for group in groups or list(pools):
        _, ports, _ = pools[group]
        if running_pid(settings, group) is None:
            for port in ports.values():
                if not _port_free(settings.bind_host, port):
                    setting = "MOSMEDAI_TRITON_*_PORT" if group == "triton" else "MOSMEDAI_SECOND_POOL_HTTP_PORT"
                    raise RuntimeError(f"port {port} is taken by another program; free it or set {setting}")
            _start(settings, group, *triton_command(settings, group), nice=TRITON_NICE)
    for group in groups or list(pools):
        pool, ports, _ = pools[group]
        _wait(f"Triton of pool {pool}", lambda: _http_ok(f"http://{settings.bind_host}:{ports['http']}/v2/health/ready"),
              settings.startup_timeout_s, settings.log_dir / f"{group}.log", (settings, group))


def check_tools_config(settings: Settings, with_admissions: bool = False) -> None:
    """Refuse an invalid tool configuration before anything starts (the gateway refuses it too,
    but its message would only be in serve.log). Raises ToolsConfigError naming the field.
    ``with_admissions``: also the admission gate, once the object store that keeps its
    decisions is up."""
    if not settings.tools_config.strip():
        return
    from mosmedai.catalog import tool_config
    from mosmedai.ingress.tenants import load_tenants
    from mosmedai.jobs.store import object_store
    from mosmedai.serving.pools import directory_for

    tenants = load_tenants(settings.tenants_file or None, settings.profile, settings.demo_tenants)
    directory = directory_for(settings) if settings.pool_discovery == "config" else None
    admitted = tool_config.admission_gate(object_store(settings), settings.results_bucket) if with_admissions else None
    tool_config.parse(settings.tools_config, settings, {t.id: t.region for t in tenants.all()}, directory, admitted)


def up(settings: Settings) -> dict[str, str]:
    """Start what is not running, wait until the gateway is ready, return the endpoints."""
    check_tools_config(settings)
    urls = endpoints(settings)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    _start_s3(settings, urls["s3"])
    check_tools_config(settings, with_admissions=True)
    start_tritons(settings)
    if running_pid(settings, "serve") is None:
        if not _port_usable(settings.bind_host, settings.gateway_http_port):
            raise RuntimeError(f"port {settings.gateway_http_port} is taken by another program; "
                               "free it or set MOSMEDAI_GATEWAY_HTTP_PORT")
        if not _port_free(settings.bind_host, settings.grpc_port):
            raise RuntimeError(f"port {settings.grpc_port} is taken by another program; free it or set MOSMEDAI_GRPC_PORT")
        _start(settings, "serve", *serve_command(settings))
    _wait("gateway", lambda: _http_ok(f"{urls['gateway']}/readyz"), settings.startup_timeout_s,
          settings.log_dir / "serve.log", (settings, "serve"))
    # The gRPC door is the gateway replica's own (mosmedai.ingress.grpc_door); readiness started it.
    _wait("gRPC", lambda: _listening(settings.grpc_port), 60.0, settings.log_dir / "serve.log", (settings, "serve"))
    if running_pid(settings, "dimse") is None:
        if not _port_free(settings.bind_host, settings.dimse_port):
            raise RuntimeError(f"port {settings.dimse_port} is taken by another program; free it or set MOSMEDAI_DIMSE_PORT")
        _start(settings, "dimse", *_python_module_command(settings, "mosmedai.ingress.dimse"))
    _wait("DIMSE", lambda: _listening(settings.dimse_port), 60.0, settings.log_dir / "dimse.log", (settings, "dimse"))
    problem = _start_prometheus(settings, urls["prometheus"])
    if problem:
        # The platform serves without it; say so plainly, once per `up`.
        print(f"mosmedai up: Prometheus NOT started: {problem}", file=sys.stderr)
        del urls["prometheus"]
    return urls


def down(settings: Settings) -> list[str]:
    """Stop every group `up` started (gateway first, so no request meets a missing Triton)."""
    stopped = [group for group in reversed(GROUPS) if _stop(settings, group)]
    remove_orphaned_shm()  # what a Triton killed at the end of its grace left
    return stopped


def status(settings: Settings) -> dict[str, int | None]:
    """Every process group and its pid (None: not running); a pool's Triton is
    ``triton`` (RU-MOW) or ``triton-<pool>``. A second pool that is not configured is left out."""
    configured = set(local_pools(settings))
    return {group: running_pid(settings, group) for group in GROUPS
            if not group.startswith("triton") or group in configured or running_pid(settings, group)}


# --- the serve process ------------------------------------------------------------------
#: Deployments `rollout` restarts, as build_app's ``versions`` keys.
DEPLOYMENTS = {"gateway": "Gateway", "router": "Router"}


def _generations(settings: Settings, name: str) -> dict[str, int]:
    try:
        return {**dict.fromkeys(DEPLOYMENTS, 1), **json.loads((settings.run_dir / name).read_text())}
    except (FileNotFoundError, ValueError):
        return dict.fromkeys(DEPLOYMENTS, 1)


def rollout(settings: Settings, deployment: str, timeout_s: float = 180.0) -> None:
    """Restart one deployment of the running Serve app ("gateway" or "router") the way Ray
    Serve upgrades a deployment (KubeRay's in-place upgrade of the Serve config): a replica of
    a new version starts, then the old one is stopped and drains (mosmedai.ingress.drain). Returns
    once only new replicas are left.

    A new gateway replica listens on the next free port of the direct-ingress range (the old
    one holds the gateway port until it has drained, and the port stays in TIME_WAIT a while
    after): the gateway is reached through Serve's proxy (``serve_proxy_port``) meanwhile;
    restarting the serve group puts it back on its port."""
    pid = running_pid(settings, "serve")
    if pid is None:
        raise RuntimeError("the serve group is not running")
    wanted = _generations(settings, ROLLOUT_FILE)
    wanted[deployment] += 1
    (settings.run_dir / ROLLOUT_FILE).write_text(json.dumps(wanted))
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout_s
    while _generations(settings, ROLLED_FILE) != wanted:
        if time.monotonic() > deadline or running_pid(settings, "serve") is None:
            raise RuntimeError(f"rollout of {deployment} not done after {timeout_s:.0f} s; "
                               f"see {settings.log_dir / 'serve.log'}")
        time.sleep(0.2)


ROLLOUT_FILE, ROLLED_FILE = "rollout.json", "rolled.json"


def _deploy(settings: Settings, generations: dict[str, int]) -> None:
    """Deploy the app at these generations and wait until each deployment runs only
    replicas of them (the old ones have drained and exited)."""
    from ray import serve
    from ray.serve._private.common import ReplicaState

    from mosmedai.ingress.app import build_app

    versions = {name: f"{name}-{generation}" for name, generation in generations.items()}
    serve.run(build_app(settings, versions), name="mosmedai", route_prefix="/", blocking=False)
    wanted = {"Gateway": settings.gateway_replicas, "Router": settings.router_replicas}
    while True:
        deployments = serve.status().applications["mosmedai"].deployments
        if all(deployments[name].replica_states == {ReplicaState.RUNNING: count} for name, count in wanted.items()):
            break
        time.sleep(0.2)
    (settings.run_dir / ROLLED_FILE).write_text(json.dumps(generations))


def serve_forever(settings: Settings) -> None:
    import ray
    from ray import serve

    ray.init(
        num_cpus=settings.ray_num_cpus,
        include_dashboard=False,
        # Images pass from gateway to router through the object store: 10 MB each,
        # a few hundred in flight at most.
        object_store_memory=512 * 1024 * 1024,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT / "services")}},
        logging_level="WARNING",
    )
    # The gateway replicas listen themselves (ray_serve_environment). Ray still starts
    # its proxy on the head node in that mode; it gets a port of its own, unused by us.
    serve.start(http_options={"host": settings.bind_host, "port": settings.serve_proxy_port})
    (settings.run_dir / ROLLOUT_FILE).unlink(missing_ok=True)
    (settings.run_dir / ROLLED_FILE).unlink(missing_ok=True)
    _deploy(settings, _generations(settings, ROLLOUT_FILE))
    print(f"mosmedai serve: ready at http://{settings.bind_host}:{settings.gateway_http_port}", flush=True)

    stopping = False
    roll = False

    def _terminate(*_):
        nonlocal stopping
        stopping = True

    def _roll(*_):
        nonlocal roll
        roll = True

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    signal.signal(signal.SIGHUP, _roll)  # `rollout`: deploy the generations of run_dir/rollout.json
    while not stopping:
        if roll:
            roll = False
            generations = _generations(settings, ROLLOUT_FILE)
            print(f"mosmedai serve: rolling to {generations}", flush=True)
            try:
                _deploy(settings, generations)
            except RuntimeError as error:  # Serve keeps the old replicas; `rollout` times out
                print(f"mosmedai serve: rollout to {generations} failed: {error}", flush=True)
            else:
                print(f"mosmedai serve: rolled to {generations}", flush=True)
        time.sleep(0.2)
    # Every replica drains (graceful_shutdown_timeout_s = gateway_shutdown_s) before Serve is down.
    serve.shutdown()
    ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args == ["serve"]:
        serve_forever(Settings())
    else:
        sys.exit("usage: python -m mosmedai.local.processes serve  (use `mosmedai up` / `mosmedai down`)")


if __name__ == "__main__":
    main()

"""Benchmark: 83 GpuPools (one per region of ../shared/data/regions.csv) reconciled and
autoscaled by the real operator process against kmock's Kubernetes API emulator and a
real Prometheus with Triton series for every pool.

    PYTHONPATH=operators python operators/bench_operator.py [--interval 10] [--passes 3]

Reports:

- reconcile pass: seconds from the 83 pools' creation until every pool has its children
  and a status for generation 1 (the operator already running and idle);
- autoscale pass: wall seconds from the first to the last of the 83 timer decisions of a
  tick, the operator's CPU seconds per tick, and the mean reconcile time per pool;
- the operator process's peak resident memory (VmHWM) and its RSS at the end.

The emulator, Prometheus and a stand-in for the Deployment controller (it marks pods ready)
run beside the operator on the same machine, so the operator's figures include waiting
for them; the CPU figure is the operator process's own.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # mosmedai_operator without installing it

import kmock  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from mosmedai_operator.policy import MetricSample, clamp, decide  # noqa: E402
from mosmedai_operator.spec import GpuPoolSpec  # noqa: E402
from mosmedai_operator.testing import (  # noqa: E402
    PROMETHEUS,
    ClusterEmulator,
    PrometheusServer,
    free_port,
    gpupool,
    openmetrics_pool,
    openmetrics_text,
    spawn_operator,
    stop_process,
    write_kubeconfig,
    write_model_repository,
)

NAMESPACE = "mosmedai"
TOOLS = ["cxr_opacity", "cxr_nodule", "cxr_pneumothorax"]
# IANA zones of Russia by UTC offset (none has daylight saving time).
ZONES = {2: "Europe/Kaliningrad", 3: "Europe/Moscow", 4: "Europe/Samara", 5: "Asia/Yekaterinburg", 6: "Asia/Omsk",
         7: "Asia/Novosibirsk", 8: "Asia/Irkutsk", 9: "Asia/Yakutsk", 10: "Asia/Vladivostok", 11: "Asia/Magadan",
         12: "Asia/Kamchatka"}
IMAGES_PER_REPLICA = 20.0
DEFAULT_REGIONS = HERE.parent.parent / "shared" / "data" / "regions.csv"


def read_regions(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def pool_for(region: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """A GpuPool per region and its load: images per second ~ population / 100 000."""
    name = region["iso_code"].lower()
    images_per_second = round(float(region["population_thousands"]) / 100, 2)
    body = gpupool(name, NAMESPACE, region=region["iso_code"], timeZone=ZONES[int(region["utc_offset_hours"])],
                   tools=TOOLS, replicas={"min": 1, "max": 16},
                   targets={"queueTimeP95Ms": 200, "gpuUtilizationPercent": 60, "imagesPerSecondPerReplica": IMAGES_PER_REPLICA},
                   schedule=[{"name": "working-day", "start": "07:30", "end": "20:00", "minReplicas": 2}],
                   scaleDown={"stabilizationWindowSeconds": 600, "maxStep": 1})
    return body, images_per_second


def settled(body: dict[str, Any], images_per_second: float, replicas: int | None) -> bool:
    """Is ``replicas`` a size the pure policy keeps under this pool's constant load?

    (Within the tolerance band more than one size can be kept; any of them is right.)
    """
    if replicas is None:
        return False
    spec = GpuPoolSpec.model_validate(body["spec"])
    now = datetime.now(timezone.utc)
    sample = MetricSample(now, queue_time_p95_ms=200, gpu_utilization_percent=60, images_per_second=images_per_second)
    return decide(spec, replicas, [sample], now).desired == replicas and clamp(spec, replicas, now).desired == replicas


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("mosmedai_operator_reconcile_seconds") and sample.labels.get("trigger") == "timer":
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def memory_kib(pid: int) -> dict[str, int]:
    result = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            result[key] = int(value.split()[0])
    return result


async def deployment_controller(cluster: ClusterEmulator, stop: asyncio.Event) -> None:
    """Stand-in for kube-controller-manager: every Deployment's pods become ready."""
    path = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments"
    while not stop.is_set():
        for (resource, namespace, name), obj in list(cluster.objects.items()):
            if _key(resource) != "apps/v1/deployments" or obj.deleted:
                continue
            raw = obj.last.raw
            want = (raw.get("spec") or {}).get("replicas", 0)
            if (raw.get("status") or {}).get("readyReplicas") != want:
                async with cluster.patch(f"{path}/{name}/status", json={"status": {"replicas": want, "readyReplicas": want}},
                                         headers={"Content-Type": "application/merge-patch+json"}):
                    pass
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        except TimeoutError:
            pass


def _key(resource: Any) -> str:
    return f"{resource.group}/{resource.version}/{resource.plural}".lstrip("/")


def pools_status(cluster: ClusterEmulator) -> dict[str, dict[str, Any]]:
    result = {}
    for (resource, _, name), obj in list(cluster.objects.items()):
        if _key(resource) == "mosmedai.io/v1alpha1/gpupools" and not obj.deleted:
            result[name] = obj.last.raw.get("status") or {}
    return result


def children_count(cluster: ClusterEmulator) -> int:
    kinds = {"apps/v1/deployments", "v1/services", "policy/v1/poddisruptionbudgets"}
    return sum(1 for (resource, _, _), obj in list(cluster.objects.items()) if _key(resource) in kinds and not obj.deleted)


async def wait_until(predicate, timeout: float, poll: float = 0.05) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError("benchmark condition not reached")
        await asyncio.sleep(poll)
    return time.monotonic()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    regions = read_regions(args.regions)[: args.limit or None]
    pools = [pool_for(region) for region in regions]
    tmp = tempfile.TemporaryDirectory(prefix="bench-operator-")
    workdir = Path(tmp.name)
    repo = write_model_repository(workdir / "model_repository", TOOLS)
    now = time.time()
    prometheus: PrometheusServer | None = None
    if os.access(PROMETHEUS, os.X_OK):
        # Queue time and GPU use at their targets, so that images per second sets the size.
        text = openmetrics_text(
            openmetrics_pool(NAMESPACE, body["metadata"]["name"], start=now - 1800, end=now + 3600,
                             queue_p95_ms=200, gpu_utilization_percent=60, images_per_second=ips, models=TOOLS)
            for body, ips in pools)
        (workdir / "prometheus").mkdir()
        prometheus = PrometheusServer(text, workdir / "prometheus").start()
    else:
        print(f"warning: {PROMETHEUS} missing: autoscaling will hold every pool (no metrics)", file=sys.stderr)

    metrics_port = free_port()
    stop = asyncio.Event()
    async with ClusterEmulator(keep_requests=64) as cluster, kmock.Server(cluster):
        cluster.declare_resources()
        cluster.namespaces.add(NAMESPACE)  # kopf watches a namespace only once it exists
        for body, _ in pools:  # all 83 exist before the operator starts: it finds them at once
            async with cluster.post(f"/apis/mosmedai.io/v1alpha1/namespaces/{NAMESPACE}/gpupools", json=body) as response:
                assert response.status < 300, await response.text()
        kubeconfig = write_kubeconfig(workdir / "kubeconfig", str(cluster.url))
        spawned = time.monotonic()
        operator = spawn_operator(kubeconfig, {
            "NAMESPACES": NAMESPACE, "STANDALONE": "true",
            "PROMETHEUS_URL": prometheus.url if prometheus else "http://127.0.0.1:9",
            "AUTOSCALE_INTERVAL_SECONDS": str(args.interval), "MODEL_REPOSITORY_PATH": str(repo),
            "METRICS_PORT": str(metrics_port), "HEALTH_PORT": "", "QUERY_STEP_SECONDS": "30",
        }, log=workdir / "operator.log")
        controller = asyncio.create_task(deployment_controller(cluster, stop))
        try:
            up = await wait_until(lambda: _answers(metrics_port), timeout=60, poll=0.05)
            cpu_up, harness_up = cpu_seconds(operator.pid), time.process_time()
            reconciled = await wait_until(
                lambda: children_count(cluster) == 3 * len(pools)
                and sum(1 for s in pools_status(cluster).values() if s.get("observedGeneration") == 1) == len(pools),
                timeout=300)
            cpu_reconcile, harness_reconcile = cpu_seconds(operator.pid) - cpu_up, time.process_time() - harness_up
            # Autoscale passes: each pool's timer fires every --interval; a pass is done when
            # the operator has made len(pools) more timer decisions.
            count = lambda: scrape(metrics_port).get("mosmedai_operator_reconcile_seconds_count", 0.0)
            base = count()
            await wait_until(lambda: count() >= base + len(pools), timeout=args.interval + 300, poll=0.05)  # warm-up pass
            base, cpu_start, sum_start = count(), cpu_seconds(operator.pid), scrape(metrics_port)["mosmedai_operator_reconcile_seconds_sum"]
            harness_start = time.process_time()
            ticks, previous = [], time.monotonic()
            for k in range(1, args.passes + 1):
                done = await wait_until(lambda: count() >= base + k * len(pools), timeout=args.interval + 300, poll=0.02)
                ticks.append(done - previous)
                previous = done
            cpu_total = cpu_seconds(operator.pid) - cpu_start
            harness_total = time.process_time() - harness_start
            final = scrape(metrics_port)
            counts = [base, final["mosmedai_operator_reconcile_seconds_count"]]
            sums = [sum_start, final["mosmedai_operator_reconcile_seconds_sum"]]
            memory = memory_kib(operator.pid)
            statuses = pools_status(cluster)
            wrong = {body["metadata"]["name"]: statuses[body["metadata"]["name"]].get("desiredReplicas")
                     for body, ips in pools if not settled(body, ips, statuses[body["metadata"]["name"]].get("desiredReplicas"))}
        finally:
            stop.set()
            await controller
            stop_process(operator)
            if prometheus:
                prometheus.stop()
            if args.keep:
                print(f"kept {workdir} (operator.log, prometheus/)", file=sys.stderr)
            else:
                tmp.cleanup()
    timer_reconciles = counts[-1] - counts[0]
    return {
        "pools": len(pools),
        "autoscale_interval_s": args.interval,
        "operator_start_s": round(up - spawned, 2),
        "reconcile_pass_s": round(reconciled - up, 2),
        "reconcile_pass_cpu_s": round(cpu_reconcile, 2),
        "reconcile_pass_emulator_cpu_s": round(harness_reconcile, 2),
        "autoscale_pass_wall_s": [round(t, 2) for t in ticks],
        "autoscale_pass_cpu_s": round(cpu_total / args.passes, 2),
        "autoscale_pass_emulator_cpu_s": round(harness_total / args.passes, 2),
        "reconcile_mean_ms": round(1000 * (sums[-1] - sums[0]) / timer_reconciles, 1) if timer_reconciles else None,
        "operator_peak_rss_mib": round(memory.get("VmHWM", 0) / 1024, 1),
        "operator_rss_end_mib": round(memory.get("VmRSS", 0) / 1024, 1),
        "desired_replicas_as_expected": not wrong,
        "mismatches": wrong,
        "prometheus": bool(prometheus),
    }


def _answers(port: int) -> bool:
    try:
        scrape(port)
        return True
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regions", type=Path, default=DEFAULT_REGIONS, help="regions CSV (iso_code, utc_offset_hours, population_thousands)")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="autoscale timer interval, seconds (short: a pass then shows the operator's throughput)")
    parser.add_argument("--passes", type=int, default=3, help="autoscale passes to time")
    parser.add_argument("--limit", type=int, default=0, help="only the first N regions (0 = all)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (operator log) for a look")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(f"GpuPools: {result['pools']}, autoscale interval {result['autoscale_interval_s']} s, real Prometheus: {result['prometheus']}")
    print(f"operator start (process spawned -> metrics endpoint up): {result['operator_start_s']} s")
    print(f"reconcile pass (all pools found -> children and status for each): {result['reconcile_pass_s']} s wall, "
          f"operator CPU {result['reconcile_pass_cpu_s']} s, emulator+harness CPU {result['reconcile_pass_emulator_cpu_s']} s")
    print(f"autoscale pass, wall ({result['pools']} timer decisions): {result['autoscale_pass_wall_s']} s")
    print(f"autoscale pass, CPU: operator {result['autoscale_pass_cpu_s']} s, emulator+harness {result['autoscale_pass_emulator_cpu_s']} s; "
          f"mean timer reconcile per pool {result['reconcile_mean_ms']} ms (mostly waiting for the emulator)")
    print(f"operator memory: peak RSS {result['operator_peak_rss_mib']} MiB, at end {result['operator_rss_end_mib']} MiB")
    print(f"every pool at a size the policy keeps for its load: {result['desired_replicas_as_expected']}")
    print(json.dumps(result))
    return 0 if result["desired_replicas_as_expected"] else 1


if __name__ == "__main__":
    sys.exit(main())

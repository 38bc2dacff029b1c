"""`make loadtest`: a short Locust run against the local platform, a report per path, and the
planner's validation (its predicted p95 for the same arrivals against the measured one).

Steps: start the local platform if it is not running (and stop it after); measure the local
Triton's service-time profile (``mosmedai profile``) unless one is given; run Locust headless
(CSV + HTML) with open Poisson-like arrivals at ``--rate`` over the chest X-ray paths; then a
second, short Locust run of the heavier integrator paths (``--extra-paths``: a 4-view
mammography study, a chest CT series, DICOMweb STOW-RS) at a low rate, kept apart so that
their load does not blur the validation; replay the first run's arrivals through the
planner's queueing core with that profile (one replica: the local Triton); write
``report.md`` and ``report.html`` with throughput and latency percentiles per path, Locust's
own CPU use, and the validation.
"""
from __future__ import annotations

import argparse
import csv
import html
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mosmedai_load.config import GpuProfile, Modality, load_profile
from mosmedai_load.queueing import simulate

PACKAGE = Path(__file__).resolve().parent
LOCUSTFILE = PACKAGE / "locustfile.py"
REPO = PACKAGE.parents[1]
#: What each path asks of the pool, in the planner's terms (tools x items, overhead from the profile).
PATH_MODALITIES = {
    "study_cxr": Modality("chest_xray", 1.0, {"cxr_opacity": 1, "cxr_nodule": 1, "cxr_pneumothorax": 1}),
    "oip_cxr": Modality("oip_cxr_nodule", 0.0, {"cxr_nodule": 1}),
}


def run_locust(host: str, out: Path, *, seconds: float, rate: float, paths: str, integrators: int,
               day_seconds: float | None = None, peak_rps: float | None = None, shares: str = "") -> dict:
    """Run Locust headless; returns its CPU seconds, wall seconds and the files it wrote."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "load_tests"), str(REPO / "services"), str(REPO / "operators"),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
               "--csv", str(out / "locust"), "--html", str(out / "locust.html"), "--only-summary",
               "--seconds", str(seconds), "--rate", str(rate), "--paths", paths, "--integrators", str(integrators),
               "--arrivals-log", str(out / "arrivals.csv"), "--loglevel", "WARNING"]
    if day_seconds:
        command += ["--day-seconds", str(day_seconds)]
    if peak_rps:
        command += ["--peak-rps", str(peak_rps)]
    if shares:
        command += ["--shares", shares]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 180)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    (out / "locust.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not (out / "locust_stats.csv").exists():
        raise RuntimeError(f"locust failed ({done.returncode}); see {out / 'locust.log'}:\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"cpu_s": cpu, "wall_s": wall, "cpu_percent_of_one_core": 100 * cpu / wall}


def read_stats(path: Path, run: str | None = None) -> list[dict]:
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            rows.append({**({"run": run} if run else {}), "path": row["Name"] if row["Name"] != "Aggregated" else "all",
                         "requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
                         "rps": float(row["Requests/s"]), "p50_ms": float(row["50%"] or 0), "p95_ms": float(row["95%"] or 0),
                         "p99_ms": float(row["99%"] or 0), "mean_ms": float(row["Average Response Time"] or 0)})
    return rows


def read_arrivals(path: Path) -> dict[str, np.ndarray]:
    data = np.genfromtxt(path, delimiter=",", names=True, dtype=None, encoding="utf-8")
    data = np.atleast_1d(data)
    return {"start_s": np.asarray(data["start_s"], float), "path": np.asarray(data["path"], str),
            "response_ms": np.asarray(data["response_ms"], float), "ok": np.asarray(data["ok"], int)}


def predict(arrivals: dict[str, np.ndarray], profile: GpuProfile, *, seeds: int = 9, replicas: int = 1,
            warmup_s: float = 2.0, overhead_samples_ms: np.ndarray | None = None) -> dict:
    """The planner's p95 for the study API, given exactly the arrivals Locust sent.

    ``overhead_samples_ms``: the off-Triton part of a study's time (upload, decode, Ray hops,
    Locust's client) as an unloaded calibration run saw it; each study draws one. Without it
    the profile's fixed overhead is used.
    """
    from mosmedai_load.capacity import mix_service_table

    modelled = np.isin(arrivals["path"], list(PATH_MODALITIES))
    arrivals = {key: value[modelled] for key, value in arrivals.items()}  # other paths: not in this model
    names = [n for n in PATH_MODALITIES if n in set(arrivals["path"])]
    mix = tuple(PATH_MODALITIES[n] for n in names)
    missing = sorted({t for m in mix for t in m.tools} - set(profile.tools))
    if missing:
        raise ValueError(f"profile {profile.name} lacks tools {missing}")
    order = np.argsort(arrivals["start_s"], kind="stable")
    start = arrivals["start_s"][order]
    t = start - start[0]
    modality = np.array([names.index(p) for p in arrivals["path"][order]], np.int8)
    service = mix_service_table(mix, profile)
    overhead = profile.overhead_s(mix)
    study = modality == names.index("study_cxr")
    keep = study & (t >= warmup_s) & (arrivals["ok"][order] == 1)
    predicted = []
    for seed in range(seeds):
        finish, busy, _ = simulate(t, modality, service, replicas=replicas, cv=profile.service_cv, seed=seed)
        ttr = finish - t + overhead[modality]
        if overhead_samples_ms is not None and len(overhead_samples_ms):
            draws = np.random.default_rng(seed).choice(overhead_samples_ms, size=int(study.sum())) / 1000
            ttr[study] = finish[study] - t[study] + draws
        predicted.append(np.percentile(ttr[keep], 95) * 1000)
    live = np.percentile(arrivals["response_ms"][order][keep], 95)
    utilisation = busy / max(t[-1], 1e-9) / replicas
    return {"studies": int(keep.sum()), "predicted_p95_ms": float(np.median(predicted)),
            "predicted_p95_ms_range": [float(min(predicted)), float(max(predicted))], "live_p95_ms": float(live),
            "ratio": float(np.median(predicted) / live), "model_utilisation": float(utilisation),
            "arrival_rate": float(len(t) / max(t[-1], 1e-9)), "profile": profile.name, "profile_source": profile.source}


def write_report(out: Path, stats: list[dict], locust: dict, validation: dict | None, settings: dict,
                 extra: dict | None = None) -> tuple[Path, Path]:
    headers = ["run", "path", "requests", "failures", "req/s", "p50 ms", "p95 ms", "p99 ms", "mean ms"]
    rows = [[r.get("run", "main"), r["path"], r["requests"], r["failures"], f"{r['rps']:.2f}", f"{r['p50_ms']:.0f}",
             f"{r['p95_ms']:.0f}", f"{r['p99_ms']:.0f}", f"{r['mean_ms']:.1f}"] for r in stats]
    facts = [("run", ", ".join(f"{k} {v}" for k, v in settings.items())),
             ("Locust CPU", f"{locust['cpu_s']:.1f} s over {locust['wall_s']:.1f} s wall = "
                            f"{locust['cpu_percent_of_one_core']:.0f} % of one core (includes building the bodies at start)")]
    for key, value in (extra or {}).items():
        facts.append((key, value))
    if validation:
        facts += [("validation", f"planner p95 {validation['predicted_p95_ms']:.1f} ms (seeds "
                                 f"{validation['predicted_p95_ms_range'][0]:.1f}-{validation['predicted_p95_ms_range'][1]:.1f}) "
                                 f"vs live p95 {validation['live_p95_ms']:.1f} ms for {validation['studies']} studies: ratio "
                                 f"{validation['ratio']:.2f} ({'within' if abs(validation['ratio'] - 1) <= 0.2 else 'OUTSIDE'} 20 %)"),
                  ("profile used", f"{validation['profile']}: {validation['profile_source']}"),
                  ("model", f"one replica (the local Triton), study = the three cxr tools in sequence at the profile's "
                            f"batch times; off-Triton time {validation.get('overhead', '')}; arrivals: the {validation['arrival_rate']:.2f} "
                            f"req/s Locust sent (both paths); model utilisation {100 * validation['model_utilisation']:.0f} %")]
    md = ["# mosmedai load test", "", "| what | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in facts], "",
          "## Per path (Locust)", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
          *["| " + " | ".join(str(c) for c in row) + " |" for row in rows], "",
          "Locust's own files: `locust.html`, `locust_stats.csv`, `locust_stats_history.csv`, `locust_failures.csv`; "
          "the arrivals sent: `arrivals.csv`.", ""]
    table = lambda hs, rs: "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in hs) + "</tr>" + "".join(  # noqa: E731
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rs) + "</table>"
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>mosmedai load test</title><style>"
            "body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px}</style></head><body><h1>mosmedai load test</h1>"
            + table(["what", "value"], facts) + "<h2>Per path (Locust)</h2>" + table(headers, rows)
            + "<p>Locust's own report: <a href='locust.html'>locust.html</a></p></body></html>")
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(page)
    (out / "report.json").write_text(json.dumps({"paths": stats, "locust": locust, "validation": validation,
                                                 "settings": settings, "extra": extra or {}}, indent=1))
    return out / "report.html", out / "report.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mosmedai loadtest", description=__doc__.splitlines()[0])
    p.add_argument("--host", help="gateway URL (default: the local platform, started if needed)")
    p.add_argument("--triton", help="Triton gRPC host:port to profile (default: the local platform's)")
    p.add_argument("--seconds", type=float, default=30.0, help="length of the Locust run")
    p.add_argument("--rate", type=float, default=4.0, help="requests/s, all paths together (Poisson-like)")
    p.add_argument("--paths", default="study_cxr,oip_cxr", help="integrator paths (scenarios.PATHS)")
    p.add_argument("--shares", default="oip_cxr=0.5",
                   help="fixed request shares of the main run's paths PATH=share,... ('' = the modality mix): "
                        "half raw tensors by default, so both paths are measured")
    p.add_argument("--integrators", type=int, default=16, help="Locust users sharing the rate")
    p.add_argument("--extra-paths", default="study_mg,study_ct,stow_cxr",
                   help="heavier paths of a second, short run ('' = none); those the platform lacks are skipped, noted")
    p.add_argument("--extra-rate", type=float, default=1.0, help="requests/s of the second run, by the modality mix")
    p.add_argument("--extra-seconds", type=float, default=30.0, help="length of the second run")
    p.add_argument("--profile", type=Path, help="service-time profile of the local pool (default: measure it now)")
    p.add_argument("--gpu", help="GPU type in --profile")
    p.add_argument("--no-validate", action="store_true", help="skip the planner's prediction")
    p.add_argument("--no-calibrate", action="store_true", help="use the profile's fixed overhead, no unloaded run")
    p.add_argument("--calibration-rate", type=float, default=1.5, help="req/s of the unloaded calibration run")
    p.add_argument("--calibration-seconds", type=float, default=15.0)
    p.add_argument("--profile-seconds", type=float, default=1.0, help="profiling time per tool and batch size")
    p.add_argument("--out", type=Path, default=Path(".run/loadtest"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    from mosmedai.local import processes as local
    from mosmedai.config import Settings

    settings = Settings()
    started_here = False
    if not args.host:
        if not all(local.status(settings).values()):
            print("starting the local platform (make up) for the load test")
            local.up(settings)
            started_here = True
        urls = local.endpoints(settings)
        args.host, args.triton = urls["gateway"], args.triton or urls["triton_grpc"]
    if not args.no_validate and not args.profile and not args.triton:
        p.error("with --host, give --triton HOST:PORT (to profile) or --profile FILE, or --no-validate")
    try:
        profile = None
        if not args.no_validate:
            if args.profile:
                profile = load_profile(args.profile, args.gpu)
            else:
                from mosmedai_load.profile import measure

                import yaml

                print(f"profiling the local Triton {args.triton} (mosmedai profile)")
                raw = measure(args.triton, ["cxr_opacity", "cxr_nodule", "cxr_pneumothorax"], [1, 2, 4, 8],
                              args.profile_seconds, gateway=args.host)
                (args.out / "profile-local.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
                profile = load_profile(args.out / "profile-local.yaml")
        calibration = None
        if profile is not None and not args.no_calibrate:
            # Unloaded: what a study's time is besides the tools', seen through Locust's own client.
            calibration = args.out / "calibration"
            calibration.mkdir(exist_ok=True)
            print(f"locust calibration: {args.calibration_rate} req/s of study_cxr for {args.calibration_seconds:.0f} s")
            run_locust(args.host, calibration, seconds=args.calibration_seconds, rate=args.calibration_rate,
                       paths="study_cxr", integrators=2)
        print(f"locust: {args.rate} req/s over {args.paths} for {args.seconds:.0f} s against {args.host}")
        shares = ",".join(item for item in args.shares.split(",")
                          if item.split("=")[0].strip() in args.paths.split(","))
        locust = run_locust(args.host, args.out, seconds=args.seconds, rate=args.rate, paths=args.paths,
                            integrators=args.integrators, shares=shares)
        extra_paths = [n.strip() for n in args.extra_paths.split(",") if n.strip()]
        extra_facts: dict[str, str] = {}
        extra_stats: list[dict] = []
        if extra_paths and args.extra_rate > 0 and args.extra_seconds > 0:
            from mosmedai_load import scenarios

            skipped = scenarios.unavailable_live(args.host, scenarios.resolve(extra_paths))
            for name, why in skipped.items():
                extra_facts[f"skipped {name}"] = why
                print(f"skipping {name}: {why}")
            run_paths = [n for n in extra_paths if n not in skipped]
            if run_paths:
                second = args.out / "paths"
                second.mkdir(exist_ok=True)
                print(f"locust: {args.extra_rate} req/s over {','.join(run_paths)} for {args.extra_seconds:.0f} s")
                cost = run_locust(args.host, second, seconds=args.extra_seconds, rate=args.extra_rate,
                                  paths=",".join(run_paths), integrators=4)
                extra_stats = read_stats(second / "locust_stats.csv", "paths")
                extra_facts["second run"] = (f"{args.extra_rate} req/s over {', '.join(run_paths)} for "
                                             f"{args.extra_seconds:.0f} s (Locust files in paths/); Locust CPU "
                                             f"{cost['cpu_s']:.1f} s over {cost['wall_s']:.1f} s wall, including "
                                             f"building the bodies (4-view MG, CT series, STOW-RS)")
    finally:
        if started_here:
            local.down(settings)
    stats = read_stats(args.out / "locust_stats.csv", "main") + extra_stats
    validation = None
    if profile is not None and "study_cxr" in args.paths:
        samples = None
        if calibration is not None:
            unloaded = read_arrivals(calibration / "arrivals.csv")
            ok = (unloaded["ok"] == 1) & (unloaded["start_s"] >= unloaded["start_s"].min() + 2.0)
            tools_ms = sum(profile.tools[t].per_item_ms(1) for t in PATH_MODALITIES["study_cxr"].tools)
            samples = np.maximum(unloaded["response_ms"][ok] - tools_ms, 0.0)
        validation = predict(read_arrivals(args.out / "arrivals.csv"), profile, overhead_samples_ms=samples)
        validation["overhead"] = (f"empirical, {len(samples)} unloaded studies (median {np.median(samples):.1f} ms)"
                                  if samples is not None and len(samples) else "the profile's fixed overhead_ms")
    html_path, md_path = write_report(args.out, stats, locust, validation,
                                      {"rate": args.rate, "seconds": args.seconds, "paths": args.paths,
                                       "integrators": args.integrators, "host": args.host}, extra_facts)
    print(md_path.read_text())
    print(f"report: {html_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Locust scenarios of the integrator paths (run: ``locust -f load_tests/mosmedai_load/locustfile.py``).

Open arrivals: each simulated integrator waits an exponential time between its requests,
with mean ``users / rate(t)``, so that the users together send a Poisson-like stream of
``rate(t)`` requests/s (close to Poisson while a response is much shorter than the mean wait;
the arrivals actually sent are logged for the planner's validation with ``--arrivals-log``).

rate(t): ``--rate`` (constant) or, by default, a region's working day replayed in
``--day-seconds`` (the planner's weekday curve, peak ``--peak-rps``) by ``RegionDayShape``.
The request mix over ``--paths`` follows the planner's modality mix (``--mix``, default
config.DEFAULT_MIX): chest X-ray and fluorography drive study_cxr (and oip_cxr, stow_cxr when
chosen), mammography study_mg, chest CT study_ct; modalities without a path are left out
(listed at start). ``--shares`` pins some paths to a fixed share of the requests instead.
Every body is built once per Locust process, before the run (``init``), and the platform is
asked first whether it serves each path (its tools in /readyz, its endpoint).
"""
from __future__ import annotations

import random
import sys
import time

from locust import HttpUser, LoadTestShape, events, task
from locust.runners import MasterRunner

from mosmedai_load import scenarios
from mosmedai_load.config import DEFAULT_MIX, Modality, parse_mapping

_state: dict = {"started": None, "senders": [], "weights": [], "log": None}


@events.init_command_line_parser.add_listener
def _options(parser):
    parser.add_argument("--paths", default="study_cxr,study_mg,study_ct", env_var="MOSMEDAI_LOAD_PATHS",
                        help=f"integrator paths, comma-separated: {sorted(scenarios.PATHS)}")
    parser.add_argument("--mix", default="", env_var="MOSMEDAI_LOAD_MIX",
                        help="modality shares NAME=share,... (default: the planner's national mix)")
    parser.add_argument("--shares", default="", env_var="MOSMEDAI_LOAD_SHARES",
                        help="fixed request shares of some paths PATH=share,... (the rest follow the mix)")
    parser.add_argument("--no-live-check", action="store_true", env_var="MOSMEDAI_LOAD_NO_LIVE_CHECK",
                        help="do not ask the platform whether it serves the paths")
    parser.add_argument("--rate", type=float, default=0.0, env_var="MOSMEDAI_LOAD_RATE",
                        help="constant requests/s (0 = replay a region's day)")
    parser.add_argument("--day-seconds", type=float, default=120.0, env_var="MOSMEDAI_LOAD_DAY_S",
                        help="a region's 24 h replayed in this many seconds")
    parser.add_argument("--start-hour", type=float, default=7.0, env_var="MOSMEDAI_LOAD_START_HOUR",
                        help="local hour the replay starts at")
    parser.add_argument("--peak-rps", type=float, default=4.0, env_var="MOSMEDAI_LOAD_PEAK_RPS",
                        help="requests/s at the busiest hour of the replayed day")
    parser.add_argument("--syntax", default="uncompressed", choices=["uncompressed", "rle"],
                        env_var="MOSMEDAI_LOAD_SYNTAX", help="transfer syntax of the study API's DICOM")
    parser.add_argument("--integrators", type=int, default=16, env_var="MOSMEDAI_LOAD_USERS",
                        help="simulated integrators (Locust users) sharing the rate")
    parser.add_argument("--seconds", type=float, default=60.0, env_var="MOSMEDAI_LOAD_SECONDS",
                        help="length of the run, s (the shape stops it)")
    parser.add_argument("--arrivals-log", default="", env_var="MOSMEDAI_LOAD_ARRIVALS_LOG",
                        help="write start time, path, response ms, ok of every request here (CSV)")


def _mix(text: str) -> tuple[Modality, ...]:
    if not text:
        return DEFAULT_MIX
    shares = parse_mapping(text, "--mix")
    unknown = sorted(set(shares) - {m.name for m in DEFAULT_MIX})
    if unknown:
        raise scenarios.PathUnavailable(f"--mix: unknown modalities {unknown}")
    return tuple(Modality(m.name, shares.get(m.name, 0.0), m.tools, m.overhead_ms) for m in DEFAULT_MIX)


@events.init.add_listener
def _init(environment, **_):
    """Resolve the paths, ask the platform, and build every body, before the shape's clock starts."""
    options = environment.parsed_options
    if options is None or isinstance(environment.runner, MasterRunner):
        return
    try:
        paths = scenarios.resolve([p.strip() for p in options.paths.split(",") if p.strip()])
        if options.host and not options.no_live_check:
            scenarios.check_live(options.host, paths)
        fixed = parse_mapping(options.shares, "--shares") if options.shares else None
        weights, dropped = scenarios.day_weights(paths, _mix(options.mix), fixed)
    except ValueError as error:  # PathUnavailable, PlanningInputError: say why and stop, no traceback
        print(f"mosmedai load: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if dropped:
        print(f"mosmedai load: modalities without an integrator path here, left out: {dropped}")
    print("mosmedai load: request shares " + ", ".join(f"{p.name} {w:.3f}" for p, w in zip(paths, weights)))
    _state["senders"] = [scenarios.sender(p, options.syntax) for p in paths]  # builds the bodies (cached)
    _state["weights"] = weights
    _state["options"] = options


@events.test_start.add_listener
def _start(environment, **_):
    options = environment.parsed_options
    if not _state["senders"]:
        _init(environment)
    _state["options"] = options
    _state["started"] = time.time()
    if options.arrivals_log:
        _state["log"] = open(options.arrivals_log, "w", buffering=1)
        _state["log"].write("start_s,path,response_ms,ok\n")


@events.request.add_listener
def _log(request_type, name, response_time, response_length, exception=None, start_time=None, **_):
    log = _state.get("log")
    if log is not None and start_time is not None:
        log.write(f"{start_time:.6f},{name},{response_time:.3f},{int(exception is None)}\n")


@events.test_stop.add_listener
def _stop(**_):
    if _state.get("log") is not None:
        _state["log"].close()
        _state["log"] = None


def current_rate() -> float:
    options = _state.get("options")
    if options is None:
        return 1.0
    if options.rate > 0:
        return options.rate
    return scenarios.rate_at(time.time() - _state["started"], day_seconds=options.day_seconds,
                             peak_rps=options.peak_rps, start_hour=options.start_hour)


class Integrator(HttpUser):
    """One regional integrator sending studies or tensors."""

    def wait_time(self):
        users = max(self.environment.runner.user_count if self.environment.runner else 1, 1)
        return random.expovariate(max(current_rate(), 1e-3) / users)

    def on_start(self):
        # desynchronise the users' first requests (otherwise all fire at spawn)
        time.sleep(random.random() * 0.5)

    @task
    def send(self):
        random.choices(_state["senders"], weights=_state["weights"])[0](self.client)


class RegionDayShape(LoadTestShape):
    """Holds ``--integrators`` users for ``--seconds``; the rate within is ``current_rate()``."""

    def tick(self):
        options = self.runner.environment.parsed_options
        if self.get_run_time() > options.seconds:
            return None
        return options.integrators, options.integrators

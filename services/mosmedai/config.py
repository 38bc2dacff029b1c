"""Platform configuration: typed and validated in one place.

Every field reads from the environment with the prefix ``MOSMEDAI_`` (e.g.
``MOSMEDAI_ROUTER_MAX_BATCH_SIZE=16``). Bad values fail at start with pydantic's message,
which names the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mosmedai.catalog.imaging import NETWORK_SIZE, TRANSPORT_MAX_SIDE

REPO_ROOT = Path(__file__).resolve().parents[2]


def _catalog() -> dict:
    from mosmedai.catalog.tools import (
        CATALOG,  # the catalog imports the family modules: load it late
    )

    return CATALOG


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MOSMEDAI_", extra="forbid")

    # --- where things run -------------------------------------------------------------
    bind_host: str = Field(
        "127.0.0.1",
        description="Address the local servers listen on. Loopback by default: the local "
        "platform has no authentication yet and must not be reachable from the network.",
    )
    gateway_http_port: int = Field(8000, ge=1, le=65535, description="Gateway HTTP port (DESIGN.md).")
    gateway_direct_grpc_port: int = Field(
        40000, ge=1, le=65535,
        description="First port of Ray Serve's direct-ingress gRPC listeners (one per gateway replica).",
    )
    serve_proxy_port: int = Field(
        8099, ge=1, le=65535,
        description="Ray Serve's own HTTP proxy. Ray starts it on the head node even though the "
        "gateway replicas serve HTTP themselves (direct ingress); nothing of ours uses it.",
    )
    triton_http_port: int = Field(8100, ge=1, le=65535, description="Triton HTTP port.")
    triton_grpc_port: int = Field(8101, ge=1, le=65535, description="Triton gRPC port.")
    triton_metrics_port: int = Field(8102, ge=1, le=65535, description="Triton metrics port.")
    triton_url: str = Field(
        "",
        description="host:port of Triton's gRPC endpoint the router calls. Empty: the local "
        "Triton at bind_host:triton_grpc_port. In a cluster: the region pool's Service.",
    )
    triton_http_url: str = Field(
        "",
        description="Base URL of Triton's HTTP endpoint, where the gateway passes Open Inference "
        "Protocol REST calls. Empty: the local Triton at http://bind_host:triton_http_port. "
        "In a cluster: http://<pool Service>:8000.",
    )
    second_pool_http_port: int = Field(
        8110, ge=1, le=65535,
        description="HTTP port of the local default's second pool (RU-TA's Triton); its gRPC and metrics "
        "ports are the next two (8111, 8112).",
    )
    second_pool_tools: list[str] = Field(
        default_factory=lambda: ["cxr_opacity", "cxr_nodule", "cxr_pneumothorax"],
        description="Tools the local default's second pool (RU-TA) loads: a subset keeps `make up` light; "
        "RU-TA's other tools run on its neighbour RU-MOW. Empty: one pool only.",
    )
    pools_file: str = Field(
        "",
        description="The pool directory (YAML/JSON list, or a path to it): name, regions, districts, endpoints "
        "(gRPC host:port), metrics_url, tools, neighbours, transfer_s (mosmedai.serving.pools). Empty: the local "
        "default (RU-MOW and RU-TA on this machine), unless pool_discovery is `kubernetes`.",
    )
    pool_discovery: Literal["config", "kubernetes"] = Field(
        "config",
        description="Where the router learns its pools: `config` (pools_file or the local default) or "
        "`kubernetes` (watches GpuPool resources in pool_namespace; mosmedai.serving.pool_discovery).",
    )
    pool_namespace: str = Field(
        "", description="Namespace whose GpuPools the router watches (kubernetes discovery); empty: its own.",
    )
    model_repository: Path = Field(
        REPO_ROOT / "model_repository",
        description="Triton model repository (one folder per model, config.pbtxt + versions).",
    )
    run_dir: Path = Field(
        REPO_ROOT / ".run",
        description="Where `make up` keeps pid files and logs (logs in run_dir/logs).",
    )

    # --- which tools ------------------------------------------------------------------
    enabled_tools: list[str] = Field(
        default_factory=lambda: list(_catalog()),
        description="Tools (Triton ensembles) this deployment serves: Triton loads only these (explicit "
        "model control) and /readyz waits for each. Default: all of them.",
    )
    tool_versions: dict[str, int] = Field(
        default_factory=dict,
        description="The version each tool runs, e.g. {\"cxr_opacity\": 2}: the router sends its images to "
        "that version's ensemble (`<tool>` for 1, `<tool>_v<N>` after) and every result names the version; "
        "Triton loads those ensembles. A tool not named runs version 1. An unknown tool, or a version the "
        "catalog or the model repository does not hold, is refused at start.",
    )

    tools_config: str = Field(
        "",
        description="Per-region tool choice (mosmedai.catalog.tool_config): which tools each region and tenant has "
        "enabled and which version of each is live, and shadow runs. YAML/JSON text, or a path to it (then "
        "re-read when it changes, without a restart). Empty: every enabled tool everywhere at tool_versions. "
        "Invalid at start: the gateway refuses to start, naming the field.",
    )
    tools_config_poll_s: float = Field(
        3.0, gt=0, le=3600,
        description="How often the gateway looks whether the tools_config file changed (s).",
    )
    tools_unload_grace_s: float = Field(
        60.0, ge=0, le=86400,
        description="A version that is live nowhere any more is unloaded from Triton after this long without "
        "a study on it (s): gateway replicas that have not re-read the file yet may still send some.",
    )

    # --- router -----------------------------------------------------------------------
    router_max_batch_size: int = Field(
        8, ge=1, le=64, description="Most images per tool in one Triton request (images)."
    )
    router_batch_wait_ms: float = Field(
        2.0,
        ge=0.0,
        le=1000.0,
        description="How long a batch may wait for more images (ms) while Triton is busy with "
        "the tool's previous batch. An image reaching an idle tool is sent at once.",
    )
    router_replicas: int = Field(1, ge=1, le=64, description="Router deployment replicas.")
    gateway_replicas: int = Field(1, ge=1, le=64, description="Gateway deployment replicas.")
    gateway_shutdown_s: float = Field(
        20.0, gt=0, le=3600,
        description="Graceful drain of a gateway or router replica (s): Ray Serve's graceful_shutdown_timeout_s. "
        "A stopping gateway answers readiness 503 and refuses new studies with 503 + Retry-After at once, "
        "finishes what is in flight, and hands its unfinished jobs back to the store within it. The chart "
        "sets it from drain.gateway.shutdownSeconds (the pod's grace period covers it).",
    )
    triton_timeout_s: float = Field(
        30.0, gt=0, le=600, description="Deadline of one Triton call (s); past it the tool fails with 504."
    )
    triton_execution_slots: int = Field(
        0, ge=0, le=1024,
        description="Model executions the local Triton runs at once (its rate limiter; urgent tools' steps "
        "get the free slots first). 0: twice the CPU cores.",
    )
    triton_retries: int = Field(
        2, ge=0, le=10, description="Retries of a Triton call that failed with UNAVAILABLE (connection)."
    )
    router_max_concurrent_batches: int = Field(
        2, ge=1, le=64,
        description="Batches of one tool a router replica keeps in one pool's Triton at once. More wait in "
        "the router, where priority and fair share order them, not in Triton's queue.",
    )

    # --- national routing: failover, spill-over, admission (issue: national serving) -------
    time_to_result_slo_s: float = Field(
        900.0, gt=0, le=86400,
        description="Time-to-result SLO of an asynchronous study (s; 15 min as in the reference workload). "
        "Spill-over compares a pool's expected wait with a fraction of it.",
    )
    sync_deadline_s: float = Field(
        10.0, gt=0, le=600,
        description="Default deadline of a synchronous study (s). A client may ask for less with "
        "`Prefer: wait=N` (RFC 7240). A study no allowed pool can finish in time gets 503 at once.",
    )
    spill_wait_fraction: float = Field(
        0.25, gt=0, le=1,
        description="A study spills to a neighbour pool when its home pool's expected wait exceeds this "
        "fraction of its budget (the deadline, or the SLO for asynchronous work).",
    )
    pool_probe_interval_s: float = Field(
        1.0, gt=0, le=60, description="How often the router checks each pool's readiness (s).",
    )
    pool_eject_after: int = Field(
        3, ge=1, le=100, description="Consecutive UNAVAILABLE answers that take a pool out of rotation.",
    )
    pool_ejection_s: float = Field(
        5.0, gt=0, le=3600,
        description="Shortest time an ejected pool stays out (s); doubles with each ejection in a row "
        "(at most 8x). It comes back when its readiness probe passes after that.",
    )
    retry_budget_fraction: float = Field(
        0.1, ge=0, le=1, description="Retries (failover) allowed as a fraction of requests in the last 10 s.",
    )
    retry_budget_min: int = Field(
        10, ge=0, le=10000, description="Retries always allowed per 10 s, so a quiet router can still fail over.",
    )

    # --- input limits -----------------------------------------------------------------
    max_body_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="Largest request body the gateway reads (bytes); larger gets 413.",
    )
    max_instances_per_request: int = Field(
        1000, ge=1, le=100000,
        description="Most DICOM instances in one multipart request (a 1000-slice CT series); more gets 413.",
    )
    max_series_per_request: int = Field(
        20, ge=1, le=1000, description="Most series in one multipart request; more gets 422.",
    )
    max_pixels: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Largest frame (rows x columns) the gateway decodes; larger gets 422.",
    )

    transport_max_side: int = Field(
        TRANSPORT_MAX_SIDE,
        ge=NETWORK_SIZE,
        le=65535,
        description="Longest side (pixels) an image keeps on its way to Triton; the gateway "
        "area-averages larger ones. 0.4 MB instead of 10 MB for a 2500x2048 radiograph.",
    )

    # --- tenants (issue: integrator interfaces) ---------------------------------------------
    profile: Literal["local", "cluster"] = Field(
        "local", description="Deployment profile. Demo tenants are refused outside `local`.",
    )
    demo_tenants: bool = Field(
        True,
        description="Add the two documented demo tenants (demo-moscow, demo-tatarstan). Local profile only: "
        "a cluster with demo tenants refuses to start.",
    )
    tenants_file: str = Field(
        "",
        description="Tenant configuration (YAML/JSON list, or a path to it; a mounted Secret in a cluster): "
        "id, region, institution, token_sha256, dimse (called AE, allowed calling AEs, result destination). "
        "Format: `python -m mosmedai.ingress.tenants --help`.",
    )

    # --- object storage and jobs ---------------------------------------------------------------
    s3_endpoint_url: str = Field(
        "", description="S3 endpoint of the object store. Empty: the local S3-compatible server `make up` "
        "starts at http://bind_host:s3_port.",
    )
    s3_region: str = Field("us-east-1", description="Region of the object store.")
    s3_port: int = Field(8300, ge=1, le=65535, description="Port of the local S3-compatible server.")
    s3_data_dir: Path | None = Field(
        None, description="Where the local S3 server keeps its write log (default run_dir/s3); it replays "
        "the log at start, so accepted studies survive a restart.",
    )
    incoming_bucket: str = Field("mosmedai-incoming", description="Identified originals, job records, indexes.")
    results_bucket: str = Field("mosmedai-results", description="Result JSON and result objects (SR, SC); "
                                "answered-study records and radiologists' feedback.")
    archive_bucket: str = Field("mosmedai-archive", description="De-identified copies (PS3.15 Annex E), kept for training.")
    retention_s: float = Field(
        7 * 86400.0, ge=0, description="How long identified originals are kept after their job ends (s).",
    )
    job_lease_s: float = Field(
        300.0, gt=0, description="How long a claimed job is held before another runner may take it (s).",
    )
    job_max_attempts: int = Field(3, ge=1, le=100, description="Attempts at a job before it fails visibly.")
    job_retry_s: float = Field(
        2.0, gt=0, le=600, description="First wait before retrying a job whose tools were unavailable (s); doubles per attempt.",
    )
    job_concurrency: int = Field(2, ge=1, le=256, description="Jobs one gateway replica runs at once.")
    job_poll_s: float = Field(
        2.0, gt=0, le=300, description="How often a gateway replica looks in the store for jobs to run (s).",
    )
    deid_uid_secret: str = Field(
        "mosmedai-local", description="Key of the keyed hash that replaces UIDs in the de-identified archive. "
        "Set a secret of your own outside the local profile.",
    )
    study_timeout_s: float = Field(
        600.0, gt=0, description="Longest a synchronous study request (HTTP, gRPC) may take (s).",
    )

    # --- gRPC and DIMSE ------------------------------------------------------------------------
    gateway_url: str = Field(
        "", description="Base URL of the gateway's HTTP API, for clients of this deployment (no door calls "
        "another: the gRPC door runs in the gateway replica, DIMSE writes to the job store). "
        "Empty: http://bind_host:gateway_http_port (the local platform). In a cluster: the gateway Service.",
    )
    grpc_port: int = Field(9000, ge=1, le=65535, description="gRPC port of each gateway replica: Open Inference "
                           "Protocol and the study service (replicas of one host share it).")
    dimse_port: int = Field(11112, ge=1, le=65535, description="DICOM C-STORE/C-ECHO port (listens on bind_host).")
    dimse_ae_title: str = Field(
        "MOSMEDAI", pattern=r"^[ -~]{1,16}$", description="Our calling AE title when sending results back by C-STORE.",
    )
    dimse_series_quiet_s: float = Field(
        10.0, gt=0, le=3600, description="A series received by C-STORE is complete after this long without a new instance (s).",
    )
    dimse_poll_s: float = Field(1.0, gt=0, le=60, description="How often series completion and result delivery run (s).")
    dimse_retry_base_s: float = Field(30.0, gt=0, description="First wait before re-sending results to a destination that was down (s).")
    dimse_retry_max_s: float = Field(3600.0, gt=0, description="Longest wait between two deliveries to a destination (s).")
    dimse_max_pdu: int = Field(262144, ge=4096, description="Largest PDU we receive (bytes).")
    dimse_max_associations: int = Field(32, ge=1, le=1024, description="Most simultaneous inbound associations.")
    dimse_network_timeout_s: float = Field(60.0, gt=0, description="Time limit of association negotiation, messages and reads (s).")
    dimse_connect_timeout_s: float = Field(10.0, gt=0, description="TCP connect timeout when delivering results (s).")

    # --- metrics (Prometheus) ------------------------------------------------------------
    router_metrics_port: int = Field(
        8201,
        ge=1,
        le=65535,
        description="First port of the routers' Prometheus endpoints (/metrics); replica i takes "
        "the first free one of router_metrics_port .. + router_replicas - 1.",
    )
    prometheus_port: int = Field(9090, ge=1, le=65535, description="Port of the local Prometheus `make up` starts.")
    prometheus_binary: str = Field(
        "prometheus",
        description="The Prometheus server `make up` runs (a name on PATH or a path; the Debian "
        "package installs /usr/bin/prometheus). Missing: the platform starts without it.",
    )
    prometheus_scrape_interval_s: float = Field(
        15.0, gt=0, le=300, description="Scrape interval of the local Prometheus (s)."
    )
    prometheus_evaluation_interval_s: float = Field(
        15.0, gt=0, le=300, description="Rule evaluation interval of the local Prometheus (s)."
    )

    # --- local platform ---------------------------------------------------------------
    ray_num_cpus: int = Field(
        2, ge=1, le=256, description="CPUs the local Ray instance may schedule (logical)."
    )
    startup_timeout_s: float = Field(
        180.0, gt=0, description="How long `make up` waits for readiness before giving up (s)."
    )

    @field_validator("enabled_tools")
    @classmethod
    def _tools_known(cls, tools: list[str]) -> list[str]:
        unknown = sorted(set(tools) - set(_catalog()))
        if unknown:
            raise ValueError(f"unknown tools {unknown}; known: {sorted(_catalog())}")
        if not tools:
            raise ValueError("at least one tool must be enabled")
        return tools

    @field_validator("tool_versions")
    @classmethod
    def _versions_known(cls, versions: dict[str, int]) -> dict[str, int]:
        catalog = _catalog()
        for tool, version in versions.items():
            if tool not in catalog:
                raise ValueError(f"tool_versions: unknown tool {tool!r}; known: {sorted(catalog)}")
            if version not in catalog[tool].versions:
                raise ValueError(f"tool_versions: tool {tool} has no version {version}; "
                                 f"its versions: {list(catalog[tool].versions)}")
        return versions

    @field_validator("second_pool_tools")
    @classmethod
    def _second_pool_tools_known(cls, tools: list[str]) -> list[str]:
        unknown = sorted(set(tools) - set(_catalog()))
        if unknown:
            raise ValueError(f"unknown tools {unknown}; known: {sorted(_catalog())}")
        return tools

    @model_validator(mode="after")
    def _ports_distinct(self) -> "Settings":
        ports = {
            "gateway_http_port": self.gateway_http_port,
            "triton_http_port": self.triton_http_port,
            "triton_grpc_port": self.triton_grpc_port,
            "triton_metrics_port": self.triton_metrics_port,
            "serve_proxy_port": self.serve_proxy_port,
            "gateway_direct_grpc_port": self.gateway_direct_grpc_port,
            "router_metrics_port": self.router_metrics_port,
            "prometheus_port": self.prometheus_port,
            "s3_port": self.s3_port,
            "grpc_port": self.grpc_port,
            "dimse_port": self.dimse_port,
        }
        if self.second_pool_tools:
            ports.update({f"second_pool_{kind}_port": port for kind, port in self.second_pool_ports.items()})
            outside = sorted(set(self.second_pool_tools) - set(self.enabled_tools))
            if outside and "second_pool_tools" not in self.model_fields_set:
                # the default subset follows enabled_tools; only a stated list must agree with it
                self.second_pool_tools = [tool for tool in self.second_pool_tools if tool in self.enabled_tools]
            elif outside:
                raise ValueError(f"second_pool_tools: {outside} are not enabled (enabled_tools)")
        if len(set(ports.values())) != len(ports):
            raise ValueError(f"ports must be distinct: {ports}")
        if self.model_repository.is_dir():  # a router in a cluster may have no repository at hand
            missing = [f"{tool} version {self.tool_versions[tool]} ({self.ensemble_of(tool)})"
                       for tool in self.tool_versions
                       if not (self.model_repository / self.ensemble_of(tool) / "config.pbtxt").is_file()]
            if missing:
                raise ValueError(f"tool_versions: not in the model repository {self.model_repository}: "
                                 f"{', '.join(missing)}")
        return self

    def tool_version(self, tool: str) -> int:
        """The version of a tool this deployment runs (tool_versions; 1 when not named)."""
        return self.tool_versions.get(tool, 1)

    def ensemble_of(self, tool: str, version: int | None = None) -> str:
        """The Triton ensemble of a tool at a version (default: the one this deployment runs)."""
        return _catalog()[tool].ensemble(self.tool_version(tool) if version is None else version)

    @property
    def second_pool_ports(self) -> dict[str, int]:
        return {"http": self.second_pool_http_port, "grpc": self.second_pool_http_port + 1,
                "metrics": self.second_pool_http_port + 2}

    @property
    def triton_grpc_target(self) -> str:
        return self.triton_url or f"{self.bind_host}:{self.triton_grpc_port}"

    @property
    def triton_http_base(self) -> str:
        return self.triton_http_url or f"http://{self.bind_host}:{self.triton_http_port}"

    @property
    def gateway_base(self) -> str:
        return self.gateway_url or f"http://{self.bind_host}:{self.gateway_http_port}"

    @property
    def s3_endpoint(self) -> str:
        return self.s3_endpoint_url or f"http://{self.bind_host}:{self.s3_port}"

    @property
    def s3_log_dir(self) -> Path:
        return self.s3_data_dir or self.run_dir / "s3"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    def as_env(self) -> dict[str, str]:
        """These settings as MOSMEDAI_* variables, for the processes `make up` starts."""
        values = self.model_dump(mode="json")
        return {
            f"MOSMEDAI_{key.upper()}": json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            for key, value in values.items()
            if value is not None  # unset optional fields stay unset
        }

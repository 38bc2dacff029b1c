"""Per-region tool choice: which tools each region (and tenant) has enabled, and which version
of each is live there.

Owns: the schema of the tool configuration (pydantic), its validation against the catalog, the
model repository, the tenants and the pool directory (`parse`); the effective choice of one
tenant (`ToolView`); and `ConfigWatcher`, which re-reads the file when it changes and switches
to the new configuration only once it is valid and its live versions are loaded in Triton.

File: ``Settings.tools_config`` (env ``MOSMEDAI_TOOLS_CONFIG``), YAML or JSON, a path (re-read
when it changes) or the text itself (fixed)::

    defaults:                    # every region not listed under `regions` (optional)
      tools: all                 # `all`: every tool this deployment serves (Settings.enabled_tools),
                                 # or a list of tool names
      versions: {}               # tool -> live version; a tool not named anywhere runs
                                 # Settings.tool_versions' version, else 1
    regions:                     # ISO 3166-2:RU codes
      RU-MOW:
        versions: {cxr_opacity: 2}
      RU-TA:
        tools: [cxr_opacity, cxr_nodule, cxr_pneumothorax]
        shadow:                  # shadow runs (mosmedai.studies.shadow): a candidate version runs beside
          cxr_opacity: {version: 2, share: 0.25}   # the live one on this share of the region's
                                                   # images; never returned, only compared
    tenants:                     # per-tenant overrides, over the tenant's region
      demo-tatarstan:
        tools: [cxr_opacity]     # replaces the region's list
        versions: {cxr_opacity: 1}   # merged over the region's versions

Precedence: tenant over region over ``defaults`` over Settings.tool_versions; ``tools`` is
replaced whole, ``versions`` and ``shadow`` merged per tool (``share: 0`` turns a shadow off). No file: every served tool enabled everywhere at
the Settings version, as before per-region choice existed.

Refused (at start, and at a reload, where the previous configuration stays), naming the field:
an unknown tool or one this deployment does not serve, a version not in the catalog or not in
the model repository, a code that is not an ISO 3166-2:RU subdivision or a region no pool
serves, a tool no pool of that region loads, an unknown tenant.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Awaitable, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mosmedai.catalog.regions import valid_region
from mosmedai.catalog.tools import CATALOG

log = logging.getLogger("mosmedai.catalog.tool_config")


class ToolsConfigError(ValueError):
    """The tool configuration is invalid; the message starts with the field (e.g.
    ``regions.RU-TA.versions.cxr_opacity``)."""


class Shadow(BaseModel):
    """A candidate version run in shadow beside the live one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(description="The candidate tool version (not the live one).")
    share: float = Field(ge=0.0, le=1.0, description="Share of the scope's images it also runs on (0 to 1).")


class Choice(BaseModel):
    """What one scope (the defaults, a region, a tenant) chooses."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tools: Literal["all"] | list[str] | None = Field(
        None, description="`all` (every served tool) or the enabled tools; null: the next scope's.")
    versions: dict[str, int] = Field(
        default_factory=dict, description="tool -> live version, merged over the next scope's.")
    shadow: dict[str, Shadow] = Field(
        default_factory=dict, description="tool -> its shadow run, merged over the next scope's.")


class ToolsConfig(BaseModel):
    """The whole file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    defaults: Choice = Field(default_factory=Choice, description="Every region not listed under `regions`.")
    regions: dict[str, Choice] = Field(default_factory=dict, description="ISO 3166-2:RU code -> its choice.")
    tenants: dict[str, Choice] = Field(default_factory=dict, description="tenant id -> its override.")


@dataclass(frozen=True)
class ToolView:
    """The effective choice of one caller: the tools it may get, the live version of each."""

    region: str
    enabled: tuple[str, ...]  # in the deployment's order (Settings.enabled_tools)
    versions: dict[str, int]  # every enabled tool -> its live version
    tenant: str | None = None
    shadow: dict[str, Shadow] | None = None  # enabled tool -> its shadow run (share > 0)

    def version(self, tool: str) -> int:
        return self.versions[tool]


class ToolChoices:
    """A validated configuration, with the facts it was checked against."""

    def __init__(self, config: ToolsConfig, served: list[str], base_versions: dict[str, int],
                 tenant_regions: dict[str, str], source_digest: str = ""):
        self.config = config
        self.served = tuple(served)
        self.base_versions = dict(base_versions)
        self.tenant_regions = dict(tenant_regions)
        self.digest = source_digest
        self._views: dict[tuple[str, str | None], ToolView] = {}

    def _scopes(self, region: str, tenant: str | None) -> list[Choice]:
        """The scopes that apply, the most specific first."""
        scopes = []
        if tenant is not None and tenant in self.config.tenants:
            scopes.append(self.config.tenants[tenant])
        scopes.append(self.config.regions.get(region, self.config.defaults))
        if region in self.config.regions:
            scopes.append(self.config.defaults)  # a region's unnamed versions fall back to the defaults'
        return scopes

    def view(self, region: str, tenant: str | None = None) -> ToolView:
        key = (region, tenant)
        found = self._views.get(key)
        if found is None:
            scopes = self._scopes(region, tenant)
            tools = next((scope.tools for scope in scopes if scope.tools is not None), "all")
            wanted = set(self.served) if tools == "all" else set(tools)
            enabled = tuple(tool for tool in self.served if tool in wanted)
            versions = {tool: self.base_versions.get(tool, 1) for tool in enabled}
            shadow: dict[str, Shadow] = {}
            for scope in reversed(scopes):  # the most specific last: it wins
                versions.update({tool: v for tool, v in scope.versions.items() if tool in versions})
                shadow.update({tool: s for tool, s in scope.shadow.items() if tool in versions})
            shadow = {tool: s for tool, s in shadow.items() if s.share > 0 and s.version != versions[tool]}
            found = self._views[key] = ToolView(region, enabled, versions, tenant, shadow)
        return found

    def view_of(self, tenant) -> ToolView:
        """A tenant's view (anything with ``id`` and ``region``)."""
        return self.view(tenant.region, tenant.id)

    def scopes(self) -> list[ToolView]:
        """Every distinct view the configuration names: the defaults, each region, each tenant."""
        views = [self.view("", None)] + [self.view(region) for region in self.config.regions]
        views += [self.view(self.tenant_regions[tenant], tenant) for tenant in self.config.tenants]
        views += [self.view(region, tenant) for tenant, region in self.tenant_regions.items()]
        return views

    def live(self) -> dict[str, list[int]]:
        """tool -> the versions live or in shadow somewhere (ascending): what Triton must hold loaded."""
        found: dict[str, set[int]] = {}
        for view in self.scopes():
            for tool, version in view.versions.items():
                found.setdefault(tool, set()).add(version)
            for tool, shadow in (view.shadow or {}).items():
                found.setdefault(tool, set()).add(shadow.version)
        return {tool: sorted(versions) for tool, versions in found.items()}


def default_choices(settings, tenant_regions: dict[str, str] | None = None) -> ToolChoices:
    """No file: every served tool, everywhere, at the Settings version."""
    return ToolChoices(ToolsConfig(), settings.enabled_tools, settings.tool_versions, tenant_regions or {})


def source_path(source: str) -> Path | None:
    """The file a tools_config names, or None when it is the text itself."""
    if source.lstrip().startswith(("{", "[", "-", "defaults:", "regions:", "tenants:")) or "\n" in source:
        return None
    return Path(source)


def _read(source: str) -> tuple[str, bool]:
    """(text, whether it came from a file)."""
    if source_path(source) is None:
        return source, False
    path = Path(source)
    if not path.is_file():
        raise ToolsConfigError(f"tools_config: {source!r} is neither YAML/JSON text nor an existing file")
    return path.read_text(), True


#: Why a tool version may not go live (None: it may): the admission gate's verdict.
AdmissionCheck = Callable[[str, int], "str | None"]


def admission_gate(store, bucket: str) -> AdmissionCheck:
    """The admission gate (mosmedai.catalog.version_admission) over the object store: a version may go
    live once the newest decision about it admitted it."""
    from mosmedai.catalog.version_admission import latest_decision
    from mosmedai.jobs.storage import StorageError

    def refusal(tool: str, version: int) -> str | None:
        try:
            decision = latest_decision(store, tool, version, bucket)
        except StorageError as error:
            if error.code != "NoSuchBucket":  # a store that cannot answer admits nothing
                return f"its admission decisions cannot be read: {error}"
            decision = None  # a new store: no decision yet
        if decision is None:
            return f"never admitted (run `mosmedai tools admit {tool} {version}` first)"
        if not decision.admitted:
            return f"refused by the admission gate at {decision.when}: {decision.reason}"
        return None

    return refusal


def check_live_versions(choices: ToolChoices, model_repository: Path | None,
                        admitted: AdmissionCheck | None = None) -> None:
    """Every live version exists: in the catalog, and (when the repository is at hand) as its
    ensemble in the model repository; and, when ``admitted`` is given, a live version other
    than the deployment's base version (Settings.tool_versions, else 1: what the deployment
    ships) has passed the admission gate. The one place where live versions are judged. A
    shadow version needs no admission: running in shadow is how a candidate is watched."""
    problems = []
    for field, scope in _scope_fields(choices.config):
        named = [(f"{field}.versions.{tool}", tool, version, True) for tool, version in scope.versions.items()]
        named += [(f"{field}.shadow.{tool}.version", tool, s.version, False) for tool, s in scope.shadow.items()]
        for where, tool, version, live in named:
            spec = CATALOG.get(tool)
            if spec is None:
                continue  # reported as an unknown tool
            if version not in spec.versions:
                problems.append(f"{where}: tool {tool} has no version {version}; "
                                f"its versions: {list(spec.versions)}")
            elif model_repository is not None and model_repository.is_dir() and \
                    not (model_repository / spec.ensemble(version) / "config.pbtxt").is_file():
                problems.append(f"{where}: version {version} ({spec.ensemble(version)}) is not in "
                                f"the model repository {model_repository}")
            elif live and admitted is not None and version != choices.base_versions.get(tool, 1):
                why = admitted(tool, version)
                if why:
                    problems.append(f"{where}: {tool} version {version} cannot go live: {why}")
    if problems:
        raise ToolsConfigError("; ".join(problems))


def _scope_fields(config: ToolsConfig) -> list[tuple[str, Choice]]:
    return ([("defaults", config.defaults)] + [(f"regions.{r}", c) for r, c in config.regions.items()]
            + [(f"tenants.{t}", c) for t, c in config.tenants.items()])


def parse(source: str, settings, tenant_regions: dict[str, str], directory=None,
          admitted: AdmissionCheck | None = None) -> ToolChoices:
    """Validate a configuration (text, or a path to it) against this deployment: ``settings``
    (served tools, base versions, model repository), the tenants (``{id: region}``) and, when
    known, the pool directory (``mosmedai.serving.pools.PoolDirectory``) and the admission gate
    (`admission_gate`). Raises ToolsConfigError."""
    return parse_text(_read(source)[0], settings, tenant_regions, directory, admitted)


def parse_text(text: str, settings, tenant_regions: dict[str, str], directory=None,
               admitted: AdmissionCheck | None = None) -> ToolChoices:
    """`parse` of the file's content."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ToolsConfigError(f"tools_config: not valid YAML/JSON: {error}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ToolsConfigError("tools_config: expected a mapping with `defaults`, `regions`, `tenants`")
    try:
        config = ToolsConfig.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ToolsConfigError(f"{where}: {first['msg']}") from None
    served = list(settings.enabled_tools)
    problems = []
    for field, scope in _scope_fields(config):
        named = list(scope.versions) + list(scope.shadow) + (list(scope.tools) if isinstance(scope.tools, list) else [])
        for tool in dict.fromkeys(named):
            if tool not in CATALOG:
                problems.append(f"{field}: unknown tool {tool!r}; known: {sorted(CATALOG)}")
            elif tool not in served:
                problems.append(f"{field}: tool {tool!r} is not served by this deployment (enabled_tools: {served})")
        if isinstance(scope.tools, list) and not scope.tools:
            problems.append(f"{field}.tools: empty; name at least one tool (or `all`)")
    for region in config.regions:
        try:
            valid_region(region)
        except ValueError as error:
            problems.append(f"regions.{region}: {error}")
            continue
        if directory is not None and not directory.order(region):
            problems.append(f"regions.{region}: no pool serves region {region} (pools: {sorted(directory.pools)})")
    for tenant in config.tenants:
        if tenant not in tenant_regions:
            problems.append(f"tenants.{tenant}: unknown tenant; known: {sorted(tenant_regions)}")
    if problems:
        raise ToolsConfigError("; ".join(problems))
    check_live_versions(ToolChoices(config, served, settings.tool_versions, tenant_regions),
                        getattr(settings, "model_repository", None), admitted)
    choices = ToolChoices(config, served, settings.tool_versions, tenant_regions,
                          hashlib.sha256(text.encode()).hexdigest())
    for field, scope in _scope_fields(config):
        region, tenant = _scope_of(field, tenant_regions)
        view = choices.view(region, tenant)
        for tool, shadow in scope.shadow.items():
            if shadow.share > 0 and tool in view.versions and shadow.version == view.versions[tool]:
                raise ToolsConfigError(f"{field}.shadow.{tool}.version: version {shadow.version} is the live version "
                                       f"there; a shadow run compares another version with it")
    if directory is not None:  # every enabled tool must run somewhere for the region
        for view in choices.scopes():
            if not view.region:
                continue
            missing = [tool for tool in view.enabled if not directory.candidates(view.region, tool)]
            if missing:
                field = f"tenants.{view.tenant}" if view.tenant in config.tenants else f"regions.{view.region}"
                raise ToolsConfigError(f"{field}.tools: no pool of region {view.region} loads {missing}")
    return choices


def _scope_of(field: str, tenant_regions: dict[str, str]) -> tuple[str, str | None]:
    """(region, tenant) of a scope's field name (``defaults``, ``regions.X``, ``tenants.Y``)."""
    kind, _, name = field.partition(".")
    if kind == "regions":
        return name, None
    if kind == "tenants":
        return tenant_regions[name], name
    return "", None


def load(settings, tenant_regions: dict[str, str], directory=None,
         admitted: AdmissionCheck | None = None) -> ToolChoices:
    """The configuration of Settings.tools_config, or the default when it is empty."""
    if not settings.tools_config.strip():
        return default_choices(settings, tenant_regions)
    return parse(settings.tools_config, settings, tenant_regions, directory, admitted)


class ReloadMetrics:
    """The watcher's Prometheus series (in the registry it is given)."""

    def __init__(self, registry):
        from prometheus_client import Counter, Gauge

        self.reloads = Counter(
            "mosmedai_tools_config_reloads",
            "Tool configuration changes seen, by outcome: applied, refused (invalid; the previous stays), "
            "load_failed (a live version could not be loaded in Triton; tried again next poll).",
            ("outcome",), registry=registry)
        for outcome in ("applied", "refused", "load_failed"):
            self.reloads.labels(outcome)
        self.last_success = Gauge(
            "mosmedai_tools_config_last_success_timestamp_seconds",
            "Unix time the tool configuration in force was applied (at start or by a reload).",
            registry=registry)
        self.last_failure = Gauge(
            "mosmedai_tools_config_last_failure_timestamp_seconds",
            "Unix time a new tool configuration was last refused or failed to load (0: never).",
            registry=registry)


class ConfigWatcher:
    """Keeps ``current`` up to date with a configuration file.

    Every ``poll_s`` it looks at the file's mtime and size; when they change it reads the file
    and compares its SHA-256 with the configuration in force. A new content is validated
    (``parse_source``) and its live versions loaded (``prepare``: Triton's repository API on
    the pools) before ``current`` switches, so no study is sent to a version that is not
    loaded. A study takes one view when it starts and keeps it: in-flight studies finish on
    the version they started with. An invalid file is refused and logged, the previous
    configuration stays; a failed load is tried again at the next poll."""

    def __init__(self, path: str | None, current: ToolChoices, parse_source: Callable[[str], ToolChoices],
                 prepare: Callable[[ToolChoices], Awaitable[None]], poll_s: float, metrics: ReloadMetrics):
        self.path = Path(path) if path else None
        self.current = current
        self.parse_source, self.prepare, self.poll_s, self.metrics = parse_source, prepare, poll_s, metrics
        self.prepared = False  # the configuration at start: its versions are loaded once, before ready
        self.last_error: str | None = None
        # None: the first poll reads the file (a change between the start's read and now is not missed)
        self._stat: tuple[float, int] | None = None
        self._refused_digest: str | None = None
        self._task: asyncio.Task | None = None
        metrics.last_success.set(time.time())

    def _stat_now(self) -> tuple[float, int] | None:
        if self.path is None:
            return None
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime, stat.st_size

    def start(self) -> None:
        """Start polling (idempotent; on the running event loop)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # never let the watcher die: the next poll tries again
                log.exception("tool configuration: reload check failed")
            await asyncio.sleep(self.poll_s)

    async def check(self) -> bool:
        """One poll: whether a new configuration was applied."""
        if not self.prepared:
            try:
                await self.prepare(self.current)
            except Exception as error:  # the router or a pool not up yet: not ready, tried next poll
                log.warning("tool configuration: loading the live versions at start failed (%s); trying again",
                            error)
                return False
            self.prepared = True
        if self.path is None:
            return False
        stat = self._stat_now()
        if stat is None or stat == self._stat:
            return False
        try:
            text = await asyncio.to_thread(self.path.read_text)
        except OSError as error:
            log.warning("tool configuration %s unreadable: %s", self.path, error)
            return False
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest == self.current.digest or digest == self._refused_digest:
            self._stat = stat
            return False
        try:
            choices = await asyncio.to_thread(self.parse_source, text)
        except ToolsConfigError as error:
            self._stat, self._refused_digest, self.last_error = stat, digest, str(error)
            self.metrics.reloads.labels("refused").inc()
            self.metrics.last_failure.set(time.time())
            log.error("tool configuration %s refused, the previous one stays: %s", self.path, error)
            return False
        try:
            await self.prepare(choices)
        except Exception as error:  # stat not noted: tried again at the next poll
            self.last_error = f"loading the live versions failed: {error}"
            self.metrics.reloads.labels("load_failed").inc()
            self.metrics.last_failure.set(time.time())
            log.error("tool configuration %s: %s; the previous one stays", self.path, self.last_error)
            return False
        self.current, self._stat, self.last_error = choices, stat, None
        self.metrics.reloads.labels("applied").inc()
        self.metrics.last_success.set(time.time())
        log.warning("tool configuration %s applied: live versions %s", self.path, choices.live())
        return True


#: The figures of a version's held-out evaluation that GET /v1/tools shows.
EVALUATION_SUMMARY = ("split", "n", "n_positive", "n_negative", "threshold", "auc", "sensitivity", "specificity",
                      "mae_deg", "grade_accuracy", "localisation_hit_rate")


@lru_cache(maxsize=None)
def tool_versions_info(tool: str, model_repository: Path) -> dict:
    """A tool's title and versions as the repository holds them: ensemble, model card, evaluation
    summary (read once per process: the repository does not change under a running gateway)."""
    spec = CATALOG[tool]
    versions = []
    for version in spec.versions:
        folder = Path(model_repository) / spec.ensemble(version)
        card = folder / "MODEL_CARD.md"
        evaluation = None
        try:
            data = json.loads((folder / "evaluation.json").read_text())
            evaluation = {key: data[key] for key in EVALUATION_SUMMARY if key in data}
        except (OSError, ValueError):
            pass
        versions.append({"version": version, "ensemble": spec.ensemble(version),
                         "in_repository": (folder / "config.pbtxt").is_file(),
                         "model_card": f"{spec.ensemble(version)}/MODEL_CARD.md" if card.is_file() else None,
                         "evaluation": evaluation})
    return {"tool": tool, "title": spec.title, "versions": versions}

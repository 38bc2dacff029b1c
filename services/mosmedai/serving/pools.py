"""The pool directory: which Triton pools exist, which regions and tools each serves, and in
what order a region's studies look for a pool.

A *pool* is one Triton endpoint, or a group of them behind one name, serving one or more
regions: a region's own pool, or a district pool that the small regions of a federal
district share. Each pool lists the tools it loads and an ordered list of neighbour pools.

A region's *pool order* is its own pools (those that list the region), or, when it has none,
its federal district's pools (``districts``; ``data/federal_districts.csv`` maps regions to
districts), followed by their neighbours in the order given. The *home pool* of a (region,
tool) pair is the first pool of that order that loads the tool; the rest of the order, where
it loads the tool, are the candidates for spill-over and failover, nearest first.

Sources: typed configuration locally (``Settings.pools_file``, or the two-pool local default
`local_directory` builds), GpuPool resources in a cluster (``mosmedai.serving.pool_discovery``).
Every mistake is refused when the directory is built, naming the pool and the field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mosmedai.catalog.regions import federal_districts, valid_region

POOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")
ENDPOINT = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$")


class PoolConfigError(ValueError):
    """The pool directory is invalid; the message names the pool and the field."""


class PoolSpec(BaseModel):
    """One pool of the directory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Pool name, unique (the GpuPool's name in a cluster; RU-MOW locally).")
    regions: tuple[str, ...] = Field((), description="ISO 3166-2:RU regions whose own pool this is.")
    districts: tuple[str, ...] = Field(
        (), description="Federal districts (CFD, NWF, ...) whose regions without a pool of their own it serves.")
    endpoints: tuple[str, ...] = Field(description="gRPC host:port of each Triton of the pool (at least one).")
    metrics_url: str = Field("", description="Triton's Prometheus endpoint (queue metrics); empty: none.")
    tools: tuple[str, ...] | None = Field(None, description="Tools the pool loads; null: every enabled tool.")
    neighbours: tuple[str, ...] = Field((), description="Pools to spill or fail over to, nearest first.")
    transfer_s: float = Field(
        0.0, ge=0, le=600,
        description="One-way time to move a study to this pool from the router (s): added to its expected "
        "wait when it is a spill or failover target.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not POOL_NAME.match(value):
            raise ValueError(f"{value!r} is not a pool name (letters, digits and '-', at most 63)")
        return value

    @field_validator("regions")
    @classmethod
    def _regions(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(valid_region(value) for value in values)

    @field_validator("districts")
    @classmethod
    def _districts(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        known = sorted(set(federal_districts().values()))
        unknown = [value for value in values if value not in known]
        if unknown:
            raise ValueError(f"unknown federal districts {unknown}; known: {known}")
        return values

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        if not values:
            raise ValueError("a pool needs at least one Triton gRPC endpoint (host:port)")
        bad = [value for value in values if not ENDPOINT.match(value)]
        if bad:
            raise ValueError(f"{bad} are not host:port gRPC endpoints")
        return values


class PoolDirectory:
    """The validated pools and every region's pool order."""

    def __init__(self, pools: Iterable[PoolSpec], enabled_tools: list[str]):
        self.pools: dict[str, PoolSpec] = {}
        self.enabled_tools = list(enabled_tools)
        for index, pool in enumerate(pools):
            if pool.name in self.pools:
                raise PoolConfigError(f"pools[{index}].name: {pool.name!r} is named twice")
            self.pools[pool.name] = pool
        if not self.pools:
            raise PoolConfigError("pools: the directory names no pool")
        for index, pool in enumerate(self.pools.values()):
            unknown = [name for name in pool.neighbours if name not in self.pools]
            if unknown:
                raise PoolConfigError(f"pools[{index}].neighbours: pool {pool.name} names unknown pools {unknown}; "
                                      f"known: {sorted(self.pools)}")
            if pool.name in pool.neighbours:
                raise PoolConfigError(f"pools[{index}].neighbours: pool {pool.name} names itself")
            if pool.tools is not None:
                unknown = [tool for tool in pool.tools if tool not in self.enabled_tools]
                if unknown:
                    raise PoolConfigError(f"pools[{index}].tools: pool {pool.name} loads unknown or disabled tools "
                                          f"{unknown}; enabled: {self.enabled_tools}")
        missing = [tool for tool in self.enabled_tools if not any(tool in self.tools_of(p) for p in self.pools)]
        if missing:
            raise PoolConfigError(f"pools[].tools: no pool loads the enabled tools {missing}")
        self._orders: dict[str, tuple[str, ...]] = {}

    def tools_of(self, pool: str) -> tuple[str, ...]:
        spec = self.pools[pool]
        return tuple(self.enabled_tools) if spec.tools is None else spec.tools

    def order(self, region: str) -> tuple[str, ...]:
        """The pools a region's studies may use, nearest first (empty: the region has none)."""
        if region not in self._orders:
            own = [name for name, pool in self.pools.items() if region in pool.regions]
            if not own:
                district = federal_districts().get(region)
                own = [name for name, pool in self.pools.items() if district and district in pool.districts]
            order = list(own)
            for name in own:  # then the neighbours, in each pool's order
                order.extend(n for n in self.pools[name].neighbours if n not in order)
            self._orders[region] = tuple(order)
        return self._orders[region]

    def candidates(self, region: str, tool: str) -> tuple[str, ...]:
        """The pools that may run ``tool`` for ``region``: home first, then spill/failover targets."""
        return tuple(name for name in self.order(region) if tool in self.tools_of(name))

    def home(self, region: str, tool: str) -> str | None:
        found = self.candidates(region, tool)
        return found[0] if found else None

    def check_regions(self, regions: dict[str, str]) -> None:
        """Refuse a directory that leaves a tenant's region (``{tenant id: region}``) without a pool."""
        orphans = sorted({f"{region} (tenant {tenant})" for tenant, region in regions.items() if not self.order(region)})
        if orphans:
            raise PoolConfigError(f"pools: no pool serves the regions {orphans}: list the region under a pool's "
                                  "`regions`, or its federal district under `districts`")

    def as_json(self) -> list[dict[str, Any]]:
        return [pool.model_dump(mode="json") for pool in self.pools.values()]


def parse_pools(source: str, enabled_tools: list[str]) -> PoolDirectory:
    """A directory from YAML/JSON text, or from a path to such a file: a list of pools, or a
    mapping with the list under ``pools``."""
    text = source
    if not source.lstrip().startswith(("[", "{", "-")) and "\n" not in source:
        path = Path(source)
        if not path.is_file():
            raise PoolConfigError(f"pools_file: {source!r} is neither YAML/JSON text nor an existing file")
        text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise PoolConfigError(f"pools_file: not valid YAML/JSON: {error}") from None
    if isinstance(data, dict):
        data = data.get("pools")
    if not isinstance(data, list):
        raise PoolConfigError("pools_file: expected a list of pools (or a mapping with `pools:`)")
    specs = []
    for index, item in enumerate(data):
        try:
            specs.append(PoolSpec.model_validate(item))
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            name = item.get("name", "?") if isinstance(item, dict) else "?"
            raise PoolConfigError(f"pools[{index}].{where}: pool {name}: {first['msg']}") from None
    return PoolDirectory(specs, enabled_tools)


def local_directory(settings) -> PoolDirectory:
    """The local default: RU-MOW's pool (every enabled tool; also the district pool of every
    federal district, so any region's tenant is served) and RU-TA's (``second_pool_tools``),
    neighbours of each other; each its own Triton process (`make up`)."""
    host = settings.bind_host
    moscow = PoolSpec(name="RU-MOW", regions=("RU-MOW",), districts=tuple(sorted(set(federal_districts().values()))),
                      endpoints=(f"{host}:{settings.triton_grpc_port}",),
                      metrics_url=f"http://{host}:{settings.triton_metrics_port}/metrics",
                      neighbours=("RU-TA",) if settings.second_pool_tools else ())
    pools = [moscow]
    if settings.second_pool_tools:
        ports = settings.second_pool_ports
        pools.append(PoolSpec(name="RU-TA", regions=("RU-TA",), endpoints=(f"{host}:{ports['grpc']}",),
                              metrics_url=f"http://{host}:{ports['metrics']}/metrics",
                              tools=tuple(settings.second_pool_tools), neighbours=("RU-MOW",)))
    return PoolDirectory(pools, settings.enabled_tools)


def directory_for(settings) -> PoolDirectory:
    """The directory a router starts with: ``pools_file`` when set, else the local default."""
    if settings.pools_file:
        return parse_pools(settings.pools_file, settings.enabled_tools)
    return local_directory(settings)


def dumps(directory: PoolDirectory) -> str:
    return json.dumps(directory.as_json())

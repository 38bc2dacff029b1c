"""A small client of the Prometheus HTTP API (``/api/v1/query_range``).

https://prometheus.io/docs/prometheus/latest/querying/api/#range-queries
"""
from __future__ import annotations

import math
import string
from collections.abc import Mapping
from dataclasses import fields
from datetime import datetime, timedelta, timezone
from typing import Any

import aiohttp

from mosmedai_operator.policy import MetricSample

SAMPLE_FIELDS = tuple(f.name for f in fields(MetricSample) if f.name != "time")


class PrometheusError(Exception):
    """Prometheus could not be reached or refused the query."""


def _promql_string(value: str) -> str:
    # Inside a double-quoted PromQL string literal: escape backslashes and quotes.
    return value.replace("\\", "\\\\").replace('"', '\\"')


def render(template: str, *, namespace: str, pool: str, region: str, tools: list[str]) -> str:
    """Fill a query template's $namespace, $pool, $region and $tools placeholders."""
    return string.Template(template).safe_substitute(
        namespace=_promql_string(namespace),
        pool=_promql_string(pool),
        region=_promql_string(region),
        tools=_promql_string("|".join(tools)),
    )


def _value(text: str) -> float | None:
    number = float(text)  # Prometheus encodes NaN and +Inf as strings too
    return number if math.isfinite(number) else None


class PrometheusClient:
    def __init__(self, base_url: str, timeout_seconds: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def query_range(self, query: str, start: datetime, end: datetime, step: timedelta) -> dict[float, float | None]:
        """{unix time: value} of a query that returns one series; {} when it returns none.

        Several series: the largest value at each time (the conservative choice).
        NaN and infinities (e.g. a quantile of an idle summary) become None.
        """
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        form = {"query": query, "start": f"{start.timestamp():.3f}", "end": f"{end.timestamp():.3f}",
                "step": f"{step.total_seconds():g}"}
        try:
            async with self._session.post(f"{self.base_url}/api/v1/query_range", data=form) as response:
                payload: dict[str, Any] = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise PrometheusError(f"{type(exc).__name__}: {exc or 'no response'}") from exc
        if payload.get("status") != "success":
            raise PrometheusError(f"{payload.get('errorType', 'error')}: {payload.get('error', payload)}")
        result: dict[float, float | None] = {}
        for series in payload["data"]["result"]:
            for at, text in series.get("values", []):
                value = _value(text)
                previous = result.get(float(at))
                result[float(at)] = value if previous is None else (previous if value is None else max(previous, value))
        return result

    async def samples(self, queries: Mapping[str, str], start: datetime, end: datetime, step: timedelta) -> list[MetricSample]:
        """Run one range query per MetricSample field in ``queries``; merge them by time."""
        by_time: dict[float, dict[str, float | None]] = {}
        for name, query in queries.items():
            if name not in SAMPLE_FIELDS:
                raise ValueError(f"unknown metric {name!r}; expected one of {SAMPLE_FIELDS}")
            for at, value in (await self.query_range(query, start, end, step)).items():
                by_time.setdefault(at, {})[name] = value
        return [MetricSample(time=datetime.fromtimestamp(at, tz=timezone.utc), **values)
                for at, values in sorted(by_time.items())]

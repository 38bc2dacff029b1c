"""The admission gate of tool versions: a version goes live only after its held-out reference
set, run through the real platform, clears the thresholds its model card declares. (Not
``mosmedai.studies.admission``: that is the gateway's admission control under load.)

This module owns:

- the thresholds: the ``## Admission thresholds`` table of a model card
  (``<repository>/<ensemble>/MODEL_CARD.md``), written by the training card writers
  (:func:`thresholds_section`) and read back here (:func:`parse_thresholds`);
- what a run needs before anything is sent (:func:`preflight`): the card, its thresholds and
  the family's reference evaluation (``mosmedai_training.<family>``: ``cases()`` and ``score()``);
  the run itself is ``mosmedai.local.admit``;
- the decision record and the audit trail: one JSON object per decision, admitted or refused,
  created with ``If-None-Match: *`` in the object store (results bucket) under
  ``admissions/<tool>/v<version>/<UTC time>-<random>.json``, so every replica and every
  operator sees the same history (:class:`AdmissionRecords`);
- what the per-region configuration asks before it makes a version live:
  :func:`latest_decision` and :func:`is_admitted` (the latest decision counts: a later
  refusal withdraws an earlier admission). Version 1 of each built-in tool was live before
  this gate existed and has no record until someone admits it.

A version with no model card, a card without thresholds, or a tool with no reference-set
generator is refused before anything is sent, naming what is missing; that refusal is
recorded too. An unknown tool or version, or a platform that cannot run the version, is an
:class:`AdmissionError` (nothing is decided, nothing recorded).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import re
import textwrap
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from mosmedai.catalog import byo
from mosmedai.catalog.tools import CATALOG, family_module
from mosmedai.jobs.storage import ObjectStore

CARD = "MODEL_CARD.md"
EVALUATION = "evaluation.json"
SECTION = "Admission thresholds"
PREFIX = "admissions/"
ADMITTED, REFUSED = "admitted", "refused"
#: The bucket decisions live in unless the caller names another (Settings.results_bucket's default).
DEFAULT_BUCKET = "mosmedai-results"
#: Reference-set size when the version has no evaluation.json to copy it from.
DEFAULT_N = 100
#: How often one case is sent again when the platform is busy (429/503 with Retry-After) or slow (504).
RETRIES = 4
_ROW = re.compile(r"^\|\s*`?(?P<metric>[A-Za-z0-9_]+)`?\s*\|\s*(?P<op>>=|<=|≥|≤)\s*(?P<bound>[-+0-9.eE]+)\s*\|")


class AdmissionError(Exception):
    """Nothing was decided: an unknown tool or version, or the platform cannot run the version."""


class ThresholdError(ValueError):
    """A model card's thresholds cannot be read; the message names the card and the line."""


# --- thresholds ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Threshold:
    metric: str
    op: str  # ">=" (the figure must be at least bound) or "<=" (at most)
    bound: float

    def passed(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False  # not measured is not passed
        return value >= self.bound if self.op == ">=" else value <= self.bound

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"


def thresholds_section(tool: str, version: int, thresholds: list[Threshold], values: dict[str, float],
                       rule: str) -> str:
    """The card's ``## Admission thresholds`` section (markdown; :func:`parse_thresholds` reads it)."""
    rows = "\n".join(f"| `{t.metric}` | {t.op} {t.bound:g} | {values.get(t.metric, 'n/a')} |" for t in thresholds)
    text = textwrap.fill(
        f"`mosmedai tools admit {tool} {version}` runs the held-out reference set through the platform, pinned "
        "to this version, scores the answers as the evaluation above does, and refuses to make the version "
        f"live unless every figure clears its bound. {rule}", width=95)
    return f"""
## {SECTION}

{text}

| metric | bound | held-out value |
| --- | --- | --- |
{rows}
"""


def parse_thresholds(text: str, source: str = CARD) -> list[Threshold]:
    """The thresholds of a model card; [] when it has no such section; ThresholdError when
    the section is there but a row cannot be read."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines)
                  if line.strip().lower() == f"## {SECTION.lower()}"), None)
    if start is None:
        return []
    found: dict[str, Threshold] = {}
    for number, line in enumerate(lines[start + 1:], start=start + 2):
        if line.startswith("## "):
            break
        if not line.lstrip().startswith("|") or set(line.replace("|", "").strip()) <= set("-: "):
            continue
        if line.replace(" ", "").lower().startswith("|metric|"):
            continue  # the header row
        match = _ROW.match(line.strip())
        if match is None:
            raise ThresholdError(f"{source} line {number}: {line.strip()!r} is not "
                                 "| `metric` | >= or <= number | ... |")
        op = {"≥": ">=", "≤": "<="}.get(match["op"], match["op"])
        try:
            bound = float(match["bound"])
        except ValueError:
            raise ThresholdError(f"{source} line {number}: bound {match['bound']!r} is not a number") from None
        if not math.isfinite(bound):
            raise ThresholdError(f"{source} line {number}: bound {match['bound']!r} is not finite")
        if match["metric"] in found:
            raise ThresholdError(f"{source} line {number}: metric {match['metric']!r} has a bound already")
        found[match["metric"]] = Threshold(match["metric"], op, bound)
    if not found:
        raise ThresholdError(f"{source}: the '## {SECTION}' section has no threshold rows")
    return list(found.values())


def replace_section(card: str, section: str) -> str:
    """The card with its admission section replaced by ``section`` (appended when absent)."""
    lines = card.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip().lower() == f"## {SECTION.lower()}"), None)
    if start is None:
        return card.rstrip("\n") + "\n" + section
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    # the section starts with a blank line before its heading
    head = "".join(lines[:start]).rstrip("\n") + "\n"
    tail = "".join(lines[end:])
    return head + section + ("\n" + tail if tail else "")


# --- the decision record ---------------------------------------------------------------------
@dataclass
class Decision:
    """One admission decision of one tool version, as stored."""

    tool: str
    version: int
    decision: str  # ADMITTED or REFUSED
    reason: str
    decided_at: float  # epoch seconds (the deciding operator's clock)
    n: int = 0  # cases sent (0: refused before sending)
    seed: int | None = None
    reference_set: str = ""
    figures: dict | None = None
    thresholds: list | None = None  # [{"metric", "op", "bound"}]
    checks: list | None = None  # [{"metric", "op", "bound", "value", "passed"}]
    missing: list | None = None  # what a refusal before sending lacked
    model_card: dict | None = None  # {"path", "sha256", "evaluated_model_sha256"}
    platform: str = ""
    operator: str = ""
    host: str = ""
    seconds: float = 0.0
    key: str = ""  # where it is stored (filled on read)

    @property
    def admitted(self) -> bool:
        return self.decision == ADMITTED

    @property
    def when(self) -> str:
        return datetime.fromtimestamp(self.decided_at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def to_json(self) -> bytes:
        record = {k: v for k, v in asdict(self).items() if k != "key"}
        record["decided_at_utc"] = self.when
        return json.dumps(record, sort_keys=True, indent=1, allow_nan=False).encode()

    @classmethod
    def from_json(cls, data: bytes, key: str = "") -> "Decision":
        record = json.loads(data)
        fields = {name for name in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in record.items() if k in fields}, key=key)


def tool_prefix(tool: str) -> str:
    return f"{PREFIX}{tool}/"


def version_prefix(tool: str, version: int) -> str:
    return f"{tool_prefix(tool)}v{version}/"


class AdmissionRecords:
    """Decisions in the object store (blocking calls). Keys sort by time within a version."""

    def __init__(self, store: ObjectStore, bucket: str = DEFAULT_BUCKET):
        self.store, self.bucket = store, bucket

    def record(self, decision: Decision) -> str:
        """Store a new decision (never overwrites one); returns its key."""
        stamp = datetime.fromtimestamp(decision.decided_at, timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        for _ in range(3):
            key = f"{version_prefix(decision.tool, decision.version)}{stamp}-{uuid.uuid4().hex[:8]}.json"
            if self.store.put(self.bucket, key, decision.to_json(), if_none_match=True,
                              content_type="application/json") is not None:
                decision.key = key
                return key
        prefix = version_prefix(decision.tool, decision.version)
        raise RuntimeError(f"could not create a new admission record under {prefix}")

    def history(self, tool: str, version: int | None = None) -> list[Decision]:
        """The tool's decisions (one version's, if named), newest first."""
        prefix = tool_prefix(tool) if version is None else version_prefix(tool, version)
        decisions = [Decision.from_json(self.store.get(self.bucket, key), key)
                     for key in self.store.list(self.bucket, prefix) if key.endswith(".json")]
        return sorted(decisions, key=lambda d: (d.decided_at, d.key), reverse=True)

    def latest(self, tool: str, version: int) -> Decision | None:
        keys = [key for key in self.store.list(self.bucket, version_prefix(tool, version)) if key.endswith(".json")]
        if not keys:
            return None
        newest = max(keys)  # the key starts with the UTC time: one GET, not one per decision
        return Decision.from_json(self.store.get(self.bucket, newest), newest)


def latest_decision(store: ObjectStore, tool: str, version: int, bucket: str = DEFAULT_BUCKET) -> Decision | None:
    """The newest decision about one tool version, or None when it was never put to the gate."""
    return AdmissionRecords(store, bucket).latest(tool, version)


def is_admitted(store: ObjectStore, tool: str, version: int, bucket: str = DEFAULT_BUCKET) -> bool:
    """Whether the newest decision about this tool version admitted it."""
    decision = latest_decision(store, tool, version, bucket)
    return decision is not None and decision.admitted


# --- the run ---------------------------------------------------------------------------------
@dataclass
class Preflight:
    """What an admission needs before it sends anything, and what is missing of it."""

    tool: str
    version: int
    card_path: Path
    card_sha256: str | None
    thresholds: list[Threshold]
    module: object | None  # the family's training module (cases, score)
    card_n: int | None  # the evaluation's n: the default reference-set size
    missing: list[str]
    model_sha256: str | None = None  # of the network the card's evaluation measured

    def card(self) -> dict | None:
        """What the decision keeps of the card: which text was read, which weights it describes."""
        if self.card_sha256 is None:
            return None
        return {"path": str(self.card_path), "sha256": self.card_sha256, "evaluated_model_sha256": self.model_sha256}


def check_version(tool: str, version: int) -> None:
    """AdmissionError naming an unknown tool or version."""
    if tool not in CATALOG:
        raise AdmissionError(f"unknown tool {tool!r}; known: {sorted(CATALOG)}")
    if version not in CATALOG[tool].versions:
        raise AdmissionError(f"tool {tool} has no version {version}; its versions: {list(CATALOG[tool].versions)}")


def reference_module(tool: str):
    """The family's training module when it can build a held-out reference set and score it, else None."""
    name = f"mosmedai_training.{CATALOG[tool].family.name}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name is not None and name.startswith(error.name):
            return None  # no training module of that family (e.g. a tool package)
        raise
    return module if callable(getattr(module, "cases", None)) and callable(getattr(module, "score", None)) else None


def preflight(tool: str, version: int, repository: Path) -> Preflight:
    check_version(tool, version)
    folder = Path(repository) / CATALOG[tool].ensemble(version)
    card_path = folder / CARD
    missing: list[str] = []
    thresholds: list[Threshold] = []
    sha = None
    if not card_path.is_file():
        missing.append(f"model card: no {card_path}")
    else:
        text = card_path.read_text(encoding="utf-8")
        sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
        try:
            thresholds = parse_thresholds(text, str(card_path))
        except ThresholdError as error:
            missing.append(f"admission thresholds: {error}")
        else:
            if not thresholds:
                missing.append(f"admission thresholds: {card_path} has no '## {SECTION}' section")
    module = reference_module(tool)
    if module is None:
        family = CATALOG[tool].family.name
        missing.append(f"reference set: no held-out case generator for {tool} (family {family!r} has no "
                       f"mosmedai_training.{family} with cases() and score()"
                       + ("; a tool package brings none" if family_module(tool) is byo else "") + ")")
    card_n, model_sha = None, None
    evaluation = folder / EVALUATION
    if evaluation.is_file():
        try:
            record = json.loads(evaluation.read_text())
            card_n, model_sha = int(record["n"]), record.get("model_sha256")
        except (ValueError, KeyError, TypeError):
            card_n = None
    return Preflight(tool, version, card_path, sha, thresholds, module, card_n, missing, model_sha)

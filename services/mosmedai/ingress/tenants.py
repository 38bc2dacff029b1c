"""Tenants: who may submit studies, how they authenticate, and where their DIMSE traffic goes.

A tenant is one institution (or one integration of it) in one region. Over HTTP it presents
a bearer token; the platform keeps only the token's SHA-256 (hex) and compares in constant
time. Over DIMSE it is identified by the called AE title (one per tenant) and restricted to
its allowed calling AE titles; results go back by C-STORE to its result destination.

Configuration (Settings.tenants_file; in a cluster a mounted Secret file): a YAML or JSON
list, or a mapping with the list under ``tenants``::

    - id: kazan-rkb                      # [a-z0-9][a-z0-9-]*, unique
      region: RU-TA                      # ISO 3166-2:RU subdivision code
      institution: "РКБ МЗ РТ"           # free text label
      token_sha256: 9f86d0...            # sha256(token) as 64 hex digits, unique;
                                         # python -m mosmedai.ingress.tenants hash-token TOKEN
      dimse:                             # optional: no DIMSE for this tenant
        called_ae_title: MOSMEDAI_RKB    # <= 16 chars, unique across tenants
        allowed_calling_aes: [RKB_PACS]  # calling AE titles accepted on that called AE
        result_destination:              # optional: where results are C-STOREd
          ae_title: RKB_PACS
          host: 10.20.0.5
          port: 104

Plain-text tokens are refused (``token:`` is an error). The two demo tenants (`DEMO_TENANTS`)
with their documented tokens exist for the local profile only: asking for them under any
other profile is an error, and the platform refuses to start.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mosmedai.catalog.regions import RU_SUBDIVISIONS, valid_region  # noqa: F401 (part of this module's API)

TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class TenantConfigError(ValueError):
    """The tenant configuration is invalid; the message names the tenant and the field."""


def hash_token(token: str) -> str:
    """sha256(token) as lowercase hex: what the configuration stores."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def valid_ae_title(value: str) -> str:
    """A DICOM AE title (PS3.5 VR AE): 1-16 characters of the default repertoire, no
    backslash or control characters, not all spaces. Returns it without surrounding spaces."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if len(value) > 16:
        raise ValueError(f"AE title {value!r} is longer than 16 characters")
    stripped = value.strip(" ")
    if not stripped:
        raise ValueError("AE title is empty")
    bad = [c for c in stripped if not (0x20 <= ord(c) <= 0x7E) or c == "\\"]
    if bad:
        raise ValueError(f"AE title {value!r} has characters outside the DICOM default repertoire: {bad!r}")
    return stripped


@dataclass(frozen=True)
class ResultDestination:
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class DimseConfig:
    called_ae_title: str
    allowed_calling_aes: tuple[str, ...]
    result_destination: ResultDestination | None = None


@dataclass(frozen=True)
class Tenant:
    id: str
    region: str
    institution: str
    token_sha256: str
    dimse: DimseConfig | None = None

    def __repr__(self) -> str:  # the hash is not secret, but keep logs short
        return f"Tenant(id={self.id!r}, region={self.region!r})"


# --- configuration schema -------------------------------------------------------------------

class _Destination(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ae_title: str = Field(description="AE title of the tenant's C-STORE SCP receiving results.")
    host: str = Field(min_length=1, description="Its host name or address.")
    port: int = Field(ge=1, le=65535, description="Its port.")

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: valid_ae_title(v)))


class _Dimse(BaseModel):
    model_config = ConfigDict(extra="forbid")
    called_ae_title: str = Field(description="The platform's AE title for this tenant (unique).")
    allowed_calling_aes: list[str] = Field(min_length=1, description="Calling AE titles accepted.")
    result_destination: _Destination | None = Field(None, description="Where results are C-STOREd.")

    _called = field_validator("called_ae_title")(classmethod(lambda cls, v: valid_ae_title(v)))

    @field_validator("allowed_calling_aes")
    @classmethod
    def _calling(cls, values: list[str]) -> list[str]:
        return [valid_ae_title(v) for v in values]


class _TenantEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="Tenant id: lowercase letters, digits, '-'.")
    region: str = Field(description="ISO 3166-2:RU code.")
    institution: str = Field(min_length=1, max_length=200, description="Institution label.")
    token_sha256: str = Field(description="sha256 hex of the bearer token.")
    dimse: _Dimse | None = None

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not TENANT_ID.match(v):
            raise ValueError(f"{v!r} is not a tenant id ([a-z0-9][a-z0-9-]*, at most 63 characters)")
        return v

    _region = field_validator("region")(classmethod(lambda cls, v: valid_region(v)))

    @field_validator("token_sha256")
    @classmethod
    def _token(cls, v: str) -> str:
        v = v.strip().lower()
        if not SHA256_HEX.match(v):
            raise ValueError("must be 64 hex digits: sha256 of the token (python -m mosmedai.ingress.tenants hash-token)")
        return v

    def tenant(self) -> Tenant:
        dimse = None
        if self.dimse is not None:
            dest = self.dimse.result_destination
            dimse = DimseConfig(
                self.dimse.called_ae_title, tuple(self.dimse.allowed_calling_aes),
                ResultDestination(dest.ae_title, dest.host, dest.port) if dest else None)
        return Tenant(self.id, self.region, self.institution, self.token_sha256, dimse)


# The documented demo tenants (local profile only). Their tokens are public by design.
DEMO_TOKENS = {"demo-moscow": "demo-moscow-token", "demo-tatarstan": "demo-tatarstan-token"}
DEMO_TENANTS: tuple[Tenant, ...] = (
    Tenant("demo-moscow", "RU-MOW", "Demo clinic, Moscow", hash_token(DEMO_TOKENS["demo-moscow"]),
           DimseConfig("MOSMEDAI_MOW", ("MOW_PACS", "STORESCU"), None)),
    Tenant("demo-tatarstan", "RU-TA", "Demo clinic, Kazan", hash_token(DEMO_TOKENS["demo-tatarstan"]),
           DimseConfig("MOSMEDAI_TA", ("TA_PACS", "STORESCU"), None)),
)


class TenantRegistry:
    """The configured tenants, looked up by token, called AE title or id."""

    def __init__(self, tenants: Iterable[Tenant]):
        self._tenants = tuple(tenants)
        self._by_id = {t.id: t for t in self._tenants}
        self._by_ae = {t.dimse.called_ae_title: t for t in self._tenants if t.dimse}

    def by_token(self, token: str | None) -> Tenant | None:
        """The tenant whose token this is. Compares the token's SHA-256 with every tenant's in
        constant time (no early exit), so timing tells nothing about which tenant is close."""
        if not token:
            return None
        presented = hash_token(token)
        found = None
        for tenant in self._tenants:
            if hmac.compare_digest(presented, tenant.token_sha256):
                found = tenant
        return found

    def by_called_ae(self, ae_title: str) -> Tenant | None:
        return self._by_ae.get(ae_title.strip(" ")) if ae_title else None

    def get(self, tenant_id: str) -> Tenant | None:
        return self._by_id.get(tenant_id)

    def all(self) -> tuple[Tenant, ...]:
        return self._tenants

    def __len__(self) -> int:
        return len(self._tenants)


def _read_source(path_or_json: str) -> Any:
    text = path_or_json.strip()
    if text.startswith(("[", "{")):
        where = "inline tenant configuration"
    else:
        path = Path(text)
        where = f"tenant configuration {path}"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TenantConfigError(f"{where}: cannot read: {exc}") from exc
    try:
        data = yaml.safe_load(text)  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        raise TenantConfigError(f"{where}: not valid YAML/JSON: {exc}") from exc
    if isinstance(data, dict) and set(data) == {"tenants"}:
        data = data["tenants"]
    if data is None:
        data = []
    if not isinstance(data, list):
        raise TenantConfigError(f"{where}: expected a list of tenants (or {{tenants: [...]}}), "
                                f"got {type(data).__name__}")
    return data


def _field(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(entry)"


def load_tenants(path_or_json: str | None, profile: str, demo_tenants: bool) -> TenantRegistry:
    """Read and validate the tenant configuration; add the demo tenants when asked.

    path_or_json: a file path, or the YAML/JSON text itself (starting with '[' or '{');
    None/empty: no configured tenants. Raises TenantConfigError naming the tenant and field.
    """
    if demo_tenants and profile != "local":
        raise TenantConfigError(
            f"demo tenants are for the local profile only; profile is {profile!r}: set "
            "MOSMEDAI_DEMO_TENANTS=false and configure the tenants in MOSMEDAI_TENANTS_FILE")
    raw = _read_source(path_or_json) if path_or_json and path_or_json.strip() else []
    tenants: list[Tenant] = []
    errors: list[str] = []
    for i, entry in enumerate(raw):
        name = entry.get("id") if isinstance(entry, dict) else None
        label = f"tenants[{i}]" + (f" (id {name!r})" if name else "")
        if isinstance(entry, dict) and "token" in entry:
            errors.append(f"{label}: field 'token': plain-text tokens are not accepted; give "
                          "token_sha256 = sha256(token) hex (python -m mosmedai.ingress.tenants hash-token)")
            continue
        try:
            tenants.append(_TenantEntry.model_validate(entry).tenant())
        except ValidationError as exc:
            for err in exc.errors():
                errors.append(f"{label}: field '{_field(err['loc'])}': {err['msg']}")
    if errors:
        raise TenantConfigError("invalid tenant configuration:\n  " + "\n  ".join(errors))
    if demo_tenants:
        tenants.extend(DEMO_TENANTS)

    seen_id: dict[str, int] = {}
    seen_token: dict[str, str] = {}
    seen_ae: dict[str, str] = {}
    for tenant in tenants:
        if tenant.id in seen_id:
            errors.append(f"tenant {tenant.id!r}: field 'id': duplicate tenant id")
        seen_id[tenant.id] = 1
        if tenant.token_sha256 in seen_token:
            errors.append(f"tenant {tenant.id!r}: field 'token_sha256': same token as tenant "
                          f"{seen_token[tenant.token_sha256]!r}")
        seen_token.setdefault(tenant.token_sha256, tenant.id)
        if tenant.dimse:
            ae = tenant.dimse.called_ae_title
            if ae in seen_ae:
                errors.append(f"tenant {tenant.id!r}: field 'dimse.called_ae_title': {ae!r} is already "
                              f"the called AE title of tenant {seen_ae[ae]!r}")
            seen_ae.setdefault(ae, tenant.id)
    if errors:
        raise TenantConfigError("invalid tenant configuration:\n  " + "\n  ".join(errors))
    if not tenants:
        raise TenantConfigError(
            "no tenants configured: set MOSMEDAI_TENANTS_FILE (or MOSMEDAI_DEMO_TENANTS=true "
            "with the local profile); nobody could submit a study")
    return TenantRegistry(tenants)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "hash-token":
        print(hash_token(args[1]))
        return
    if len(args) == 2 and args[0] == "check":
        registry = load_tenants(args[1], "cluster", False)
        print(json.dumps([t.id for t in registry.all()]))
        return
    print("usage: mosmedai tenants hash-token TOKEN | check FILE", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()


def client_token() -> str:
    """The bearer token our own clients (CLI, benchmark, load tests) send: MOSMEDAI_TOKEN,
    else the local demo tenant demo-moscow's."""
    return os.environ.get("MOSMEDAI_TOKEN") or DEMO_TOKENS["demo-moscow"]


def auth_headers(token: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token or client_token()}"}


_installed: TenantRegistry | None = None


def install_registry(registry: TenantRegistry) -> None:
    """Make the registry the one this process authenticates against (the gateway's
    middleware reads it; one gateway replica per process)."""
    global _installed
    _installed = registry


def installed_registry() -> TenantRegistry | None:
    return _installed

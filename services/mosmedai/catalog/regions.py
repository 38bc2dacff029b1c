"""The regions the platform serves: ISO 3166-2:RU codes, each region's UTC offset and federal
district (tables in ``mosmedai/data``)."""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

#: the package's data folder (package data of the ``mosmedai`` distribution)
DATA = Path(__file__).resolve().parents[1] / "data"

# ISO 3166-2:RU subdivision codes (the 83 subjects the standard lists).
RU_SUBDIVISIONS = frozenset(
    "AD AL ALT AMU ARK AST BA BEL BRY BU CE CHE CHU CU DA IN IRK IVA KAM KB KC KDA KEM KGD KGN "
    "KHA KHM KIR KK KL KLU KO KOS KR KRS KYA LEN LIP MAG ME MO MOS MOW MUR NEN NGR NIZ NVS OMS "
    "ORE ORL PER PNZ PRI PSK ROS RYA SA SAK SAM SAR SE SMO SPE STA SVE TA TAM TOM TUL TVE TY "
    "TYU UD ULY VGG VLA VLG VOR YAN YAR YEV ZAB".split()
)


def valid_region(value: str) -> str:
    if not isinstance(value, str) or not value.startswith("RU-") or value[3:] not in RU_SUBDIVISIONS:
        raise ValueError(f"{value!r} is not an ISO 3166-2:RU subdivision code (e.g. RU-MOW, RU-TA)")
    return value


DISTRICTS_FILE = DATA / "federal_districts.csv"


@lru_cache(maxsize=1)
def federal_districts() -> dict[str, str]:
    """ISO 3166-2:RU region -> federal district code (CFD, NWF, ...)."""
    with open(DISTRICTS_FILE, newline="") as handle:
        reader = csv.DictReader(line for line in handle if not line.startswith("#"))
        return {row["iso_code"]: row["district"] for row in reader}


REGION_OFFSETS_FILE = DATA / "region_utc_offsets.csv"


@lru_cache(maxsize=1)
def _region_offsets() -> dict[str, float]:
    with open(REGION_OFFSETS_FILE, newline="") as handle:
        rows = csv.DictReader(line for line in handle if not line.startswith("#"))
        return {row["iso_code"]: float(row["utc_offset_hours"]) for row in rows}


def utc_offset_hours(region: str) -> float:
    """The region's UTC offset (hours); Moscow's (+3) for a code the table lacks."""
    return _region_offsets().get(region, 3.0)

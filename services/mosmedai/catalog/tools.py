"""The AI tool catalog and the choice of tools from a DICOM header.

A tool is a Triton ensemble ``<name>`` made of ``<preprocess> -> <name>_net -> <name>_post``;
families share a preprocess model where the work is the same (every projection radiograph
goes through ``xr_preprocess``, each CT family through its own grid). Tools are described
in their family module (``mosmedai.catalog.families.*``) or in a tool package (``mosmedai.catalog.byo``);
this module gathers them. Import order, one way: ``families``, ``byo`` <- ``tools`` <-
``model_repo`` (which renders the Triton repository from this catalog).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from types import ModuleType

from mosmedai.catalog import byo
from mosmedai.catalog.families import VERSION_SUFFIX, ToolSpec

#: Family modules, in catalog order.
FAMILY_MODULES = ("chest_xray", "fluorography", "mammography", "spine_xray", "ct_brain", "ct_chest")


def _load_families() -> dict[str, ModuleType]:
    modules = {}
    for name in FAMILY_MODULES:
        try:
            modules[name] = importlib.import_module(f"mosmedai.catalog.families.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"mosmedai.catalog.families.{name}":
                raise
    return modules


#: A tool name that would read as another tool's version ensemble (``<tool>_v<N>``).
VERSIONED_NAME = re.compile(rf".+{VERSION_SUFFIX}[0-9]+")


def _name_problem(name: str) -> str | None:
    if VERSIONED_NAME.fullmatch(name):
        return f"tool name {name!r} ends in '{VERSION_SUFFIX}<digits>', the names of version ensembles"
    return None


FAMILY_MODULE_OF: dict[str, ModuleType] = {}
CATALOG: dict[str, ToolSpec] = {}
for _module in _load_families().values():
    for _spec in _module.TOOLS:
        if _spec.name in CATALOG:
            raise ValueError(f"tool {_spec.name} is defined twice")
        if _name_problem(_spec.name):
            raise ValueError(_name_problem(_spec.name))
        CATALOG[_spec.name] = _spec
        FAMILY_MODULE_OF[_spec.name] = _module

#: The tools defined in this repository's family modules (a tool package may not reuse a name).
BUILTIN_TOOLS: frozenset[str] = frozenset(CATALOG)


def _load_packages() -> None:
    """Tool packages named by MOSMEDAI_TOOL_PACKAGES (a path list; see mosmedai.catalog.byo)."""
    import os

    path_list = os.environ.get("MOSMEDAI_TOOL_PACKAGES", "")
    if not path_list.strip():
        return
    for package in byo.package_dirs(path_list):
        spec = byo.load_package(package)
        if spec.name in CATALOG:
            where = "a built-in tool" if spec.name in BUILTIN_TOOLS else "another package's tool"
            raise byo.PackageError([f"{package}/manifest.yaml: name: {spec.name!r} is {where}; choose another name"])
        if _name_problem(spec.name):
            raise byo.PackageError([f"{package}/manifest.yaml: {_name_problem(spec.name)}; choose another name"])
        CATALOG[spec.name] = spec
        FAMILY_MODULE_OF[spec.name] = byo


_load_packages()



def ensemble_of(tool: str, version: int = 1) -> str:
    """The Triton ensemble that runs one version of a tool (ToolSpec.ensemble)."""
    return CATALOG[tool].ensemble(version)


def family_module(tool: str) -> ModuleType:
    return FAMILY_MODULE_OF[tool]


@dataclass(frozen=True)
class HeaderFacts:
    """The header attributes tool selection looks at, normalised to upper case."""

    modality: str = ""
    body_part: str = ""
    view_position: str = ""
    laterality: str = ""
    series_description: str = ""
    looked_at: dict[str, str] = field(default_factory=dict)


def accepts(spec: ToolSpec, facts: HeaderFacts) -> bool:
    """Whether a tool reads this image: modality first, then body part, view or description."""
    if facts.modality not in spec.modalities:
        return False
    description = facts.series_description
    if any(keyword in description for keyword in spec.exclude_keywords):
        return False
    if spec.required_keywords:
        return any(keyword in description for keyword in spec.required_keywords)
    if facts.body_part and facts.body_part in spec.body_parts:
        return not spec.views or not facts.view_position or facts.view_position in spec.views or spec.view_alone_suffices
    # Many radiographs carry no Body Part Examined; a chest view (PA/AP) on a projection
    # radiograph is a chest film in practice, and the description is the last resort.
    if spec.view_alone_suffices and not facts.body_part and facts.view_position in spec.views:
        return True
    if not spec.body_parts and (not spec.views or facts.view_position in spec.views):
        return True  # the modality alone decides (e.g. MG with a CC/MLO view)
    return any(keyword in description for keyword in spec.description_keywords)


def select_tools(facts: HeaderFacts, enabled: list[str]) -> list[ToolSpec]:
    return [CATALOG[name] for name in enabled if name in CATALOG and accepts(CATALOG[name], facts)]

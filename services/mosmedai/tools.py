"""The AI tool catalog and the choice of tools from a DICOM header.

A tool is a Triton ensemble ``<name>`` made of ``<family>_preprocess -> <name>_net ->
<name>_post``. Families share a preprocess model where the work is the same (all
radiographs of the chest go through ``cxr_preprocess``). The catalog is laid out for the
18 tools of the national platform; this file lists those that exist in
``model_repository/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Modality (0008,0060) values of projection radiography.
PROJECTION_RADIOGRAPHY = frozenset({"CR", "DX", "DR"})
# View Position (0018,5101) values of a frontal chest radiograph.
CHEST_VIEWS = frozenset({"PA", "AP"})


@dataclass(frozen=True)
class ToolSpec:
    name: str
    family: str  # modality family, names the shared preprocess model
    title: str
    finding: str  # what a positive result means, for people
    modalities: frozenset[str]
    body_parts: frozenset[str] = frozenset()
    views: frozenset[str] = frozenset()
    description_keywords: tuple[str, ...] = ()

    @property
    def preprocess_model(self) -> str:
        return f"{self.family}_preprocess"

    @property
    def network_model(self) -> str:
        return f"{self.name}_net"

    @property
    def postprocess_model(self) -> str:
        return f"{self.name}_post"


def _chest_xray(name: str, title: str, finding: str) -> ToolSpec:
    return ToolSpec(
        name=name,
        family="cxr",
        title=title,
        finding=finding,
        modalities=PROJECTION_RADIOGRAPHY,
        body_parts=frozenset({"CHEST", "THORAX", "LUNG"}),
        views=CHEST_VIEWS,
        description_keywords=("CHEST", "THORAX", "LUNG", "ГРУД", "ОГК"),
    )


CATALOG: dict[str, ToolSpec] = {
    spec.name: spec
    for spec in (
        _chest_xray("cxr_opacity", "Chest X-ray: lung opacity", "lung opacity (consolidation)"),
        _chest_xray("cxr_nodule", "Chest X-ray: focal nodule", "focal lung nodule"),
        _chest_xray("cxr_pneumothorax", "Chest X-ray: pneumothorax", "pneumothorax"),
    )
}


@dataclass(frozen=True)
class HeaderFacts:
    """The header attributes tool selection looks at, normalised to upper case."""

    modality: str = ""
    body_part: str = ""
    view_position: str = ""
    series_description: str = ""
    looked_at: dict[str, str] = field(default_factory=dict)


def accepts(spec: ToolSpec, facts: HeaderFacts) -> bool:
    """Whether a tool reads this image: modality first, then body part, view or description."""
    if facts.modality not in spec.modalities:
        return False
    if facts.body_part and facts.body_part in spec.body_parts:
        return True
    # Many chest radiographs carry no Body Part Examined; a PA/AP view on a projection
    # radiograph is a chest film in practice, and the description is the last resort.
    if facts.view_position and facts.view_position in spec.views and not facts.body_part:
        return True
    description = facts.series_description
    return any(keyword in description for keyword in spec.description_keywords)


def select_tools(facts: HeaderFacts, enabled: list[str]) -> list[ToolSpec]:
    return [CATALOG[name] for name in enabled if name in CATALOG and accepts(CATALOG[name], facts)]

"""Synthetic example studies, one per family, for `mosmedai example` and the tests.

Every family of the catalog has an example a new user can send to the platform, drawn by
the family's reference phantom (``mosmedai.phantoms.*``) with a finding of its tools:

=============  ============================================  ============================
family         what is written                               tools that read it
=============  ============================================  ============================
chest_xray     one DX PA chest radiograph, 2500 x 2048       cxr_opacity, cxr_nodule,
                                                             cxr_pneumothorax
fluorography   one DX screening fluorogram ("ФЛГ")           flg_triage, flg_nodule,
                                                             flg_fibrosis
mammography    a screening study: R/L x CC/MLO, four MG      mg_mass, mg_calcification,
               images (a folder)                             mg_density
spine_xray     one DX whole-spine AP film with a scoliosis   spine_scoliosis
ct_brain       one axial head CT series (a folder)           ctb_hemorrhage, ctb_ischemia,
                                                             ctb_midline_shift
ct_chest       one axial chest CT series (a folder)          ctc_covid, ctc_nodule,
                                                             ctc_emphysema, ctc_cac,
                                                             ctc_bone_density
=============  ============================================  ============================

An image family writes one file; a study or series writes a folder of Part-10 files that
``mosmedai submit FOLDER`` sends as one multipart study. Everything is deterministic from
the seed. The phantoms are reference data for software, not clinical images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

#: Families in catalog order (mosmedai.catalog.tools.FAMILY_MODULES).
FAMILIES = ("chest_xray", "fluorography", "mammography", "spine_xray", "ct_brain", "ct_chest")
#: Families whose example is a folder (a study of several images, or a CT series).
FOLDER_FAMILIES = frozenset({"mammography", "ct_brain", "ct_chest"})
#: The finding drawn by default, and the ones that can be asked for ("none": a clean one).
FINDINGS: dict[str, tuple[str, ...]] = {
    "chest_xray": ("cxr_nodule", "cxr_opacity", "cxr_pneumothorax"),
    "fluorography": ("nodule", "fibrosis", "opacity"),
    "mammography": ("mg_mass", "mg_calcification"),
    "spine_xray": ("scoliosis",),
    "ct_brain": ("haemorrhage",),
    "ct_chest": ("covid", "nodule", "emphysema", "cac"),
}


@dataclass
class Example:
    family: str
    datasets: list[pydicom.Dataset]
    description: str  # one line for people: what was drawn, and where

    @property
    def study_instance_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)


def _chest_xray(seed: int, finding: str | None) -> Example:
    from mosmedai.phantoms.chest_xray import make_phantom, to_dataset

    phantom = make_phantom((seed, 0), shape=(2500, 2048), findings=[finding] if finding else [])
    box = phantom.boxes.get(finding) if finding else None
    return Example("chest_xray", [to_dataset(phantom)], "synthetic 2500x2048 DX chest radiograph"
                   + (f", {finding} drawn at (row0,col0,row1,col1) {box}" if box else ", no finding"))


def _fluorography(seed: int, finding: str | None) -> Example:
    from mosmedai.phantoms import fluorography

    phantom = fluorography.make_phantom((seed, 0), findings=[finding] if finding else [])
    box = phantom.box(f"flg_{finding}") if finding in ("nodule", "fibrosis") else None
    rows, columns = phantom.shape
    return Example("fluorography", [fluorography.to_dataset(phantom, fluorography.DESCRIPTIONS[1])],
                   f"synthetic {rows}x{columns} screening fluorogram (ФЛГ)"
                   + (f", {finding} drawn" + (f" at (row0,col0,row1,col1) {box}" if box else "") if finding
                      else ", no finding"))


def _mammography(seed: int, finding: str | None) -> Example:
    from mosmedai.phantoms import mammography

    study, patient = generate_uid(), f"PHANTOM-MG-{seed}"
    datasets, where = [], ""
    # The finding is drawn in the left CC view only: a screening study is mostly normal views.
    for number, (laterality, view) in enumerate((("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")), start=1):
        drawn = [finding] if finding and (laterality, view) == ("L", "CC") else []
        phantom = mammography.make_phantom((seed, number), laterality=laterality, view=view, findings=drawn,
                                           category=2)
        if drawn:
            where = f", {finding} drawn in the L CC view at (row0,col0,row1,col1) {phantom.boxes.get(finding)}"
        datasets.append(mammography.to_dataset(
            phantom, StudyInstanceUID=study, PatientID=patient, PatientName=f"PHANTOM^MG{seed}",
            SeriesNumber=number, InstanceNumber=1))
    rows, columns = datasets[0].Rows, datasets[0].Columns
    return Example("mammography", datasets, f"synthetic screening mammography study, 4 MG views (R/L CC, R/L MLO) "
                   f"of about {rows}x{columns}, breast density C" + (where or ", no finding"))


def _spine_xray(seed: int, finding: str | None) -> Example:
    from mosmedai.phantoms import spine_xray

    phantom = spine_xray.make_phantom((seed, 0), cobb=28.0 if finding else 0.0)
    rows, columns = phantom.stored.shape
    return Example("spine_xray", [spine_xray.to_dataset(phantom)],
                   f"synthetic {rows}x{columns} DX whole-spine AP film, Cobb angle {phantom.cobb_deg:.1f} deg")


def _ct_brain(seed: int, finding: str | None) -> Example:
    from mosmedai.phantoms import ct_brain
    from mosmedai.phantoms.dicom_build import ct_series

    # The first anatomy of the seed with (or without) a haemorrhage that shifts the midline.
    for index in range(200):
        anatomy = ct_brain.make_anatomy((seed, index))
        if (anatomy.haemorrhage is not None and anatomy.shift != 0.0) == bool(finding) and anatomy.ischaemia is None:
            break
    else:
        raise RuntimeError(f"no head phantom of seed {seed} in 200 draws has the asked-for finding; try another seed")
    hu, _ = ct_brain.render(anatomy, ct_brain.CASE_SIZE, seed=(seed, index))
    pixel = anatomy.fov / ct_brain.CASE_SIZE
    datasets = ct_series(hu, (anatomy.dz, pixel, pixel), body_part="HEAD", series_description="КТ ГОЛОВНОГО МОЗГА",
                         SpecificCharacterSet="ISO_IR 192", PatientPosition="HFS",
                         PatientID=f"PHANTOM-CTB-{seed}", PatientName=f"PHANTOM^CTB{seed}")
    what = (f"a haemorrhage shifting the midline by {abs(anatomy.shift):.1f} mm" if finding else "no finding")
    return Example("ct_brain", datasets, f"synthetic head CT series, {len(datasets)} slices of "
                   f"{ct_brain.CASE_SIZE}x{ct_brain.CASE_SIZE}, {anatomy.dz:.1f} mm apart, {what}")


def _ct_chest(seed: int, finding: str | None) -> Example:
    from mosmedai.phantoms import ct_chest
    from mosmedai.phantoms.dicom_build import ct_series

    findings = {name: name == finding for name in ct_chest.FINDINGS}
    phantom = ct_chest.make_phantom((seed, 0), findings=findings)
    hu, _ = phantom.render()
    datasets = ct_series(hu, phantom.spacing_mm, body_part="CHEST", series_description="КТ ОГК без контраста",
                         SpecificCharacterSet="ISO_IR 192", PatientPosition="HFS", KVP="120",
                         ConvolutionKernel="STANDARD", PatientID=f"PHANTOM-CTC-{seed}",
                         PatientName=f"PHANTOM^CTC{seed}")
    slices, rows, columns = hu.shape
    return Example("ct_chest", datasets, f"synthetic chest CT series, {slices} slices of {rows}x{columns}, "
                   f"{phantom.spacing_mm[0]:.1f} mm apart, " + (f"{finding} drawn" if finding else "no finding"))


_BUILDERS = {"chest_xray": _chest_xray, "fluorography": _fluorography, "mammography": _mammography,
             "spine_xray": _spine_xray, "ct_brain": _ct_brain, "ct_chest": _ct_chest}


def make_example(family: str, seed: int = 7, finding: str | None = "default") -> Example:
    """The example of a family; ``finding`` is one of FINDINGS[family], None for a clean
    one, or "default" (the family's first finding)."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; families: {', '.join(FAMILIES)}")
    if finding == "default":
        finding = FINDINGS[family][0]
    if finding is not None and finding not in FINDINGS[family]:
        raise ValueError(f"{family} draws {', '.join(FINDINGS[family])} (or none), not {finding!r}")
    return _BUILDERS[family](seed, finding)


def write_example(example: Example, output: str | Path) -> list[Path]:
    """Write an example: one file at ``output`` (image families) or a folder of files."""
    output = Path(output)
    if example.family not in FOLDER_FAMILIES:
        output.parent.mkdir(parents=True, exist_ok=True)
        example.datasets[0].save_as(output, enforce_file_format=True)
        return [output]
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for number, dataset in enumerate(example.datasets, start=1):
        if example.family == "mammography":
            name = f"{dataset.ImageLaterality}-{dataset.ViewPosition}.dcm"
        else:
            name = f"slice-{number:03d}.dcm"
        written.append(output / name)
        dataset.save_as(written[-1], enforce_file_format=True)
    return written


def example_name(family: str) -> str:
    """The name of a family's example in a folder of all of them: chest_xray.dcm, ...,
    mammography/, ct_brain/, ct_chest/."""
    return family if family in FOLDER_FAMILIES else f"{family}.dcm"

"""The `mosmedai` command's dispatch (the platform commands are tested in test_platform)."""

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mosmedai.local.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_help_lists_every_command():
    listed = run("--help").stdout
    for command in ("up", "down", "status", "submit", "example", "capacity", "profile"):
        assert command in listed


def test_capacity_is_the_planner_and_names_a_bad_regions_file():
    answer = run("capacity", "--regions", "/nonexistent/regions.csv", "--no-progress")
    assert answer.returncode == 2
    assert "/nonexistent/regions.csv" in answer.stderr + answer.stdout


def test_example_writes_a_readable_chest_radiograph(tmp_path):
    from mosmedai.pipeline.dicom_input import decode

    path = tmp_path / "chest.dcm"
    answer = run("example", str(path), "--finding", "cxr_opacity")
    assert answer.returncode == 0 and "cxr_opacity drawn at" in answer.stdout
    image = decode(path.read_bytes(), 64 * 1024 * 1024)
    assert image.stored.shape == (2500, 2048) and image.facts.body_part == "CHEST"


def test_example_writes_every_family_and_each_reaches_its_tools(tmp_path):
    from mosmedai.pipeline.dicom_input import decode
    from mosmedai.local.examples import FAMILIES, FOLDER_FAMILIES, example_name
    from mosmedai.catalog.tools import CATALOG, select_tools

    answer = run("example", str(tmp_path), "--family", "all")
    assert answer.returncode == 0, answer.stderr
    for family in FAMILIES:
        path = tmp_path / example_name(family)
        files = sorted(path.glob("*.dcm")) if family in FOLDER_FAMILIES else [path]
        assert len(files) == {"mammography": 4}.get(family, len(files)) and files, family
        if family.startswith("ct_"):
            assert len(files) >= 20, f"{family}: a CT series, not {len(files)} slices"
        images = [decode(file.read_bytes(), 64 * 1024 * 1024) for file in files]
        assert len({image.study_instance_uid for image in images}) == 1, f"{family}: one study"
        family_tools = [name for name, spec in CATALOG.items() if spec.family.name == family]
        chosen = {spec.name for image in images for spec in select_tools(image.facts, list(CATALOG))}
        assert chosen == set(family_tools), f"{family}: the header routes to {sorted(chosen)}"
        assert f"wrote {path}" in answer.stdout


def test_example_names_a_finding_its_family_cannot_draw(tmp_path):
    answer = run("example", str(tmp_path / "mg"), "--family", "mammography", "--finding", "cxr_nodule")
    assert answer.returncode == 2 and "mg_mass" in answer.stderr and not (tmp_path / "mg").exists()


def test_submit_sends_a_folder_as_one_study(platform, tmp_path):
    folder = tmp_path / "ct_brain"
    assert run("example", str(folder), "--family", "ct_brain").returncode == 0
    answer = subprocess.run([sys.executable, "-m", "mosmedai.local.cli", "submit", str(folder), "--url", platform["gateway"]],
                            capture_output=True, text=True, timeout=600)
    assert answer.returncode == 0, answer.stderr
    assert "1 item(s)" in answer.stdout and "volume CT" in answer.stdout, answer.stdout
    for tool in ("ctb_hemorrhage", "ctb_midline_shift"):
        assert tool in answer.stdout

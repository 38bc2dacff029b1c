"""The `mosmedai` command's dispatch (the platform commands are tested in test_platform)."""

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mosmedai.cli", *args], capture_output=True, text=True,
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
    from mosmedai.dicom_input import decode

    path = tmp_path / "chest.dcm"
    answer = run("example", str(path), "--finding", "cxr_opacity")
    assert answer.returncode == 0 and "cxr_opacity drawn at" in answer.stdout
    image = decode(path.read_bytes(), 64 * 1024 * 1024)
    assert image.stored.shape == (2500, 2048) and image.facts.body_part == "CHEST"

"""The three studio notebooks: committed stripped, thin, and run top to bottom under nbval.

nbval compares outputs only for cells that were run in the reference notebook, and the
committed notebooks are stripped (no outputs, no execution counts). So the expected output of
each ``# NBVAL_CHECK_OUTPUT`` cell lives here, in ``EXPECTED``; the test writes a copy of each
notebook with those outputs filled in and runs ``pytest --nbval-lax`` on the copy in a
subprocess (a fresh kernel, no real weights, videos written to a temporary folder).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")  # a test extra: collection works without it

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("01_load_and_quantize.ipynb", "02_infinitetalk.ipynb", "03_debug_contiguity.ipynb")
CHECK = "# NBVAL_CHECK_OUTPUT"
COLAB_GUARD = 'if "google.colab" in sys.modules:'

# cell id -> the stdout a check cell prints on the tiny preset (deterministic: seeded weights)
EXPECTED = {
    "nb01-10": (
        "disabled           Linear weights x1.00\n"
        "fp8_e4m3fn         Linear weights x0.25\n"
        "fp8_e4m3fn_scaled  Linear weights x0.25\n"
        "fp8_e4m3fn_fast    Linear weights x0.25\n"
        "fp8_e5m2_scaled    Linear weights x0.25\n"
        "fp4_experimental   Linear weights x0.13\n"
        "fp4_scaled         Linear weights x0.14\n"
        "fp4_scaled_fast    Linear weights x0.14\n"
    ),
    "nb02-09": "clips 2/2, last error: None\n",
    "nb02-12": "17 (64, 64) 1 (17, 64, 64, 3)\n",
    "nb03-08": "0 violations; 0 hidden copies\n",
    "nb03-12": "LayoutError before the launch, naming the layer: True\n",
    "nb03-17": "1 copy per forward; strict forward now: None\n",
}


def load(name: str):
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("name", NAMES)
def test_committed_stripped(name):
    nb = load(name)
    nbformat.validate(nb)
    for cell in code_cells(nb):
        assert cell.outputs == [] and cell.execution_count is None, f"{name} {cell.id}: strip outputs"
    assert "widgets" not in nb.metadata, f"{name}: saved widget state; strip it"


@pytest.mark.parametrize("name", NAMES)
def test_first_code_cell_is_the_guarded_colab_install(name):
    first = code_cells(load(name))[0].source
    assert COLAB_GUARD in first and "%pip install" in first
    # the magic is inside the guard (indented): a no-op outside Colab
    assert all(line.startswith("    ") for line in first.splitlines() if "%pip" in line)


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_are_thin(name):
    for cell in code_cells(load(name)):
        body = [
            line for line in cell.source.splitlines() if line.strip() and not line.lstrip().startswith("#")
        ]
        assert len(body) <= 10, f"{name} {cell.id}: {len(body)} lines of code; move logic into wanstudio"
        assert not any(line.startswith(("def ", "class ")) for line in body), f"{name} {cell.id}"


def test_every_check_cell_has_an_expectation():
    checks = {c.id for name in NAMES for c in code_cells(load(name)) if CHECK in c.source}
    assert checks == set(EXPECTED)


def with_expected_outputs(name: str, folder: Path) -> Path:
    """A copy of the notebook whose check cells hold their expected output (so nbval compares)."""
    nb = load(name)
    for i, cell in enumerate(code_cells(nb), start=1):
        if cell.id in EXPECTED:
            cell.execution_count = i
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=EXPECTED[cell.id])]
    path = folder / name
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_under_nbval(name, tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    path = with_expected_outputs(name, folder)
    env = {k: v for k, v in os.environ.items() if k != "WANSTUDIO_WEIGHTS"}
    env.update(
        WANSTUDIO_OUTPUT=str(tmp_path / "videos"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        PYTHONWARNINGS="ignore::DeprecationWarning",
        MPLBACKEND="Agg",
    )
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "--nbval-lax",
        "--nbval-current-env",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        "--rootdir",
        str(tmp_path),
        "--nbval-cell-timeout",
        "600",
        str(path),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    if name == "02_infinitetalk.ipynb":
        assert (tmp_path / "videos" / "scripted.mp4").stat().st_size > 0

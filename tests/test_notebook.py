"""The privacy-techniques notebook is saved clean and runs top to bottom on a fresh kernel.

The kernel is this interpreter (a kernelspec written to a temporary folder points at
`sys.executable`), its working directory is a temporary folder and it imports this
checkout's packages; nothing is written into the repository.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "compare_privacy_techniques.ipynb"
KERNEL = "cogov-test-venv"


def _kernel_manager(tmp_path: Path) -> KernelManager:
    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "cogov test venv",
        "language": "python",
    }))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def _outputs(nb, output_type: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == output_type]


def _text(nb) -> str:
    parts = [o.text for o in _outputs(nb, "stream")]
    for kind in ("execute_result", "display_data"):
        parts += [o.data.get("text/plain", "") for o in _outputs(nb, kind)]
    return "\n".join(parts)


def test_notebook_is_saved_valid_and_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= len(code) // 2


@pytest.mark.slow
def test_notebook_runs_and_every_check_in_it_passes(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    before = {p.name: p.read_bytes() for p in NOTEBOOK.parent.iterdir() if p.is_file()}
    nb = nbformat.read(NOTEBOOK, as_version=4)
    probe = copy.deepcopy(nb)
    probe.cells.append(nbformat.v4.new_code_cell(
        "import sys\nimport mpc\nprint('PROBE', sys.prefix, mpc.__file__)"))
    workdir = tmp_path / "run"
    workdir.mkdir()
    client = NotebookClient(probe, km=_kernel_manager(tmp_path), timeout=600,
                            resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError on the first failing cell (asserts included)

    assert _outputs(probe, "error") == []
    probe_line = next(line for line in _text(probe).splitlines() if line.startswith("PROBE"))
    _, prefix, mpc_file = probe_line.split(" ")
    assert prefix == sys.prefix
    assert Path(mpc_file).resolve().is_relative_to(REPO)

    text = _text(probe)
    for expected in ("differing claims", "IntersectionTooSmall", "TLSv1.3",
                     "PSI-aggregate (intersection-sum)", "health authority"):
        assert expected in text
    images = [o for kind in ("display_data", "execute_result") for o in _outputs(probe, kind)
              if "image/png" in o.data]
    assert images, "the plots were not rendered inline"

    after = {p.name: p.read_bytes() for p in NOTEBOOK.parent.iterdir() if p.is_file()}
    assert after == before, "running the notebook wrote into notebooks/"

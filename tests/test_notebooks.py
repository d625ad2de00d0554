"""The notebooks in notebooks/: they run top to bottom, hold no outputs, and define no package code.

No Jupyter kernel is needed (jupyter is not a dependency): a notebook is JSON, and its code cells are
executed in order, in one fresh namespace, with plain `exec`, from the notebooks folder, with
matplotlib's file-only Agg backend. STYLE rule 12 ("notebooks import the package and show, plot and
explain; they never define model or loss code") is checked at the level of names: no code cell may
define a function or class that the packages define, nor any torch module.
"""
from __future__ import annotations

import ast
import json
import linecache
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
PACKAGES = ("smollm", "dpo")


def load_notebook(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def code_cells(nb: dict) -> list[str]:
    return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for c in nb["cells"] if c["cell_type"] == "code"]


def package_names() -> set[str]:
    """Every function, method and class name defined anywhere in smollm/ and dpo/ (private ones too)."""
    names = set()
    for package in PACKAGES:
        for source in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(node.name)
    return names - {"__init__", "forward", "main"}  # too generic to mean "a copy of the package"


def test_there_is_a_notebook():
    assert NOTEBOOKS


def notebook_check(path: Path):
    """The facts a notebook teaches, checked on what it computed: `check(ns, out_dir)` in
    tests/nbcheck_<notebook name>.py, one module per notebook (None when it has none)."""
    import importlib

    if not (Path(__file__).parent / f"nbcheck_{path.stem}.py").is_file():
        return None
    return importlib.import_module(f"nbcheck_{path.stem}").check


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean_nbformat_4_without_outputs(path):
    nb = load_notebook(path)
    assert nb["nbformat"] == 4
    assert nb["cells"], "empty notebook"
    for i, cell in enumerate(nb["cells"]):
        assert cell["cell_type"] in ("code", "markdown"), (i, cell["cell_type"])
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"cell {i} has stored outputs: clear them before committing"
            assert cell.get("execution_count") is None, f"cell {i} has an execution count"
    # The cells run as plain Python here and in any kernel: no IPython magics or shell escapes.
    for i, source in enumerate(code_cells(nb)):
        for line in source.splitlines():
            assert not line.lstrip().startswith(("%", "!")), f"code cell {i} uses IPython syntax: {line!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_defines_no_package_code(path):
    """STYLE rule 12: import the package, never redefine it (no second copy of a model or a loss)."""
    forbidden = package_names()
    assert {"dpo_loss", "sequence_logprobs", "SmolLM", "DPOTrainer", "RMSNorm"} <= forbidden  # the guard sees them
    for i, source in enumerate(code_cells(load_notebook(path))):
        for node in ast.walk(ast.parse(source, f"{path.name}:cell{i}")):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                assert node.name not in forbidden, f"code cell {i} defines {node.name!r}, which the package defines"
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b) for b in node.bases}
                assert not bases & {"nn.Module", "torch.nn.Module", "Module"}, \
                    f"code cell {i} defines a torch module {node.name!r}: models belong in smollm/"
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda):
                for target in node.targets:
                    assert not (isinstance(target, ast.Name) and target.id in forbidden), \
                        f"code cell {i} defines {target.id!r} as a lambda, which the package defines"


def run_notebook(path: Path) -> dict:
    """Execute the code cells in order in one namespace; a failure names the cell and shows its code."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns: dict = {"__name__": "__main__"}
    try:
        for i, source in enumerate(code_cells(load_notebook(path))):
            filename = f"{path.name}:cell{i}"
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks show code
            exec(compile(source, filename, "exec"), ns)
            plt.close("all")
    finally:
        plt.close("all")
    return ns





@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(NOTEBOOK_DIR)  # as `jupyter lab notebooks/` starts it
    monkeypatch.setenv("DPO_NOTEBOOK_OUT", str(tmp_path))  # files go here, not into runs/
    monkeypatch.delenv("SMOLLM_CHECKPOINT", raising=False)  # never the optional real-model cell
    monkeypatch.setenv("SMOLLM_OFFLINE", "1")  # never the network
    monkeypatch.setenv("DPO_NOTEBOOK_MODEL", "tiny")  # the smoke run: a tiny random model, not the real one
    start = time.perf_counter()
    ns = run_notebook(path)
    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n{path.name}: all code cells ran in {seconds:.0f} s")
    check = notebook_check(path)
    if check is not None:
        check(ns, tmp_path)

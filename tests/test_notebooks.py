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
import math
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
    assert any(p.name == "01_dpo_walkthrough.ipynb" for p in NOTEBOOKS), NOTEBOOKS


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


def check_01_dpo_walkthrough(ns: dict, out: Path) -> None:
    """Facts the walkthrough teaches, checked on what it computed."""
    # The filter report adds up, and it kept some real pairs but not all.
    report = ns["report"]
    assert report.total == len(ns["pairs"]) == 400
    assert report.kept + sum(report.rejected.values()) == report.total
    assert 0 < report.kept < report.total
    # The response mask: 0 on the prompt, 1 from the first response token through EOS.
    tp = ns["tp"]
    assert tp.chosen_mask == [0] * tp.prompt_len + [1] * (len(tp.chosen_ids) - tp.prompt_len)
    assert tp.chosen_ids[-1] == ns["tokenizer"].eos_token_id
    # Equal policy and reference log-probs give a sigmoid DPO loss of ln 2.
    assert ns["losses"].tolist() == pytest.approx([math.log(2)] * len(ns["losses"]), abs=1e-6)
    # Training: ln 2 at step 1 (policy == reference), then the held-out policy accuracy rises.
    metrics, before, after = ns["metrics"], ns["before"], ns["after"]
    assert len(metrics) == ns["train_config"].max_steps
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert before.reward_accuracy == 0.0 and before.policy_accuracy == before.reference_accuracy
    assert after.policy_accuracy > before.policy_accuracy
    assert after.policy_accuracy >= 0.8 and after.mean_margin > 0
    assert after.reference_accuracy == before.reference_accuracy  # the reference never trains
    # The curves were written where the test asked, as a PNG.
    assert ns["png"] == out / "curves.png"
    assert ns["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


CHECKS = {"01_dpo_walkthrough.ipynb": check_01_dpo_walkthrough}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(NOTEBOOK_DIR)  # as `jupyter lab notebooks/` starts it
    monkeypatch.setenv("DPO_NOTEBOOK_OUT", str(tmp_path))  # files go here, not into runs/
    monkeypatch.delenv("SMOLLM_CHECKPOINT", raising=False)  # never the optional real-model cell
    monkeypatch.setenv("SMOLLM_OFFLINE", "1")  # never the network
    start = time.perf_counter()
    ns = run_notebook(path)
    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n{path.name}: all code cells ran in {seconds:.0f} s")
    check = CHECKS.get(path.name)
    if check is not None:
        check(ns, tmp_path)

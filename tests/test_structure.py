"""The shape of the book: every module is exported from one chapter, imports only chapters before it, and stays small.

A module's chapter is the notebook named in its generated header (`File to edit: ../nbs/30_train.ipynb`); the
chapters are read in the order of their numbers. Inference must not need the training code."""
import ast, re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "talkinggs"
SKIP = {"__init__", "_modidx", "__main__"}


def chapters() -> dict[str, str]:
    "module name -> its notebook's file name."
    out = {}
    for p in PKG.glob("*.py"):
        if p.stem in SKIP: continue
        m = re.search(r"File to edit: \.\./nbs/(\S+\.ipynb)", p.read_text())
        assert m, f"{p.name} has no nbdev header: talkinggs/*.py are exported from notebooks, never written by hand"
        out[p.stem] = m.group(1)
    return out


def imports(name: str) -> set[str]:
    "The talkinggs modules `name` imports (absolute or relative, anywhere in the file)."
    found = set()
    for node in ast.walk(ast.parse((PKG / f"{name}.py").read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1: found.add(mod.split(".")[0] if mod else "")
            elif mod.startswith("talkinggs."): found.add(mod.split(".")[1])
            elif mod == "talkinggs": found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("talkinggs."))
    return {m for m in found if m and m not in SKIP and (PKG / f"{m}.py").exists()}


def order(nb: str) -> tuple:
    return (nb.split("_")[0], nb)


def test_no_module_imports_a_later_chapter():
    ch = chapters()
    late = [(m, ch[m], d, ch[d]) for m in ch for d in imports(m) if order(ch[d]) > order(ch[m])]
    assert not late, "forward references (module, chapter, imports, its chapter): " + repr(late)


def test_inference_does_not_import_training():
    seen, todo = set(), ["synthesize", "evaluate"]
    while todo:                                              # everything synthesize and evaluate need, transitively
        m = todo.pop()
        if m in seen: continue
        seen.add(m); todo.extend(imports(m))
    assert "train" not in seen, "synthesize and evaluate must reach the model without the training module"


def test_modules_are_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in PKG.glob("*.py") if p.stem not in SKIP}
    big = {k: v for k, v in sizes.items() if v >= 500}
    assert not big, f"modules of 500 lines or more: {big}"


def test_checks_can_fail(tmp_path):
    "The import parser sees relative and absolute imports (a check that sees nothing would always pass)."
    assert "train" in imports("bench") and "model" in imports("synthesize") and "core" in imports("gaussians")

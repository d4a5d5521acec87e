"""The shape of the book: every module is exported from one chapter, imports only chapters before it, and stays small.

A module's chapter is the notebook named in its generated header (`File to edit: ../nbs/30_train.ipynb`); the
chapters are read in the order of their numbers. Inference must not need the training code."""
import ast, io, re, tokenize
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
    big = {k: v for k, v in sizes.items() if v > 400}
    assert not big, f"modules over 400 lines (split the chapter by idea): {big}"


def generated_all(lines: list[str]) -> set[int]:
    "Line numbers (0-based) of the `__all__` list nbdev writes (pformat at width 160: the tool's, not ours)."
    out = set()
    for i, line in enumerate(lines):
        if line.startswith("__all__ = "):
            k = i
            while True:
                out.add(k)
                if lines[k].rstrip().endswith("]"): break
                k += 1
    return out


def long_lines(text: str) -> list[int]:
    "1-based numbers of lines over 120 bytes of UTF-8 (Δ counts twice), nbdev's generated `__all__` aside."
    lines = text.splitlines()
    skip = generated_all(lines)
    return [i + 1 for i, line in enumerate(lines) if len(line.encode()) > 120 and i not in skip]


def semicolon_lines(text: str) -> list[int]:
    "1-based numbers of lines with a `;` statement separator (strings and comments do not count)."
    toks = tokenize.generate_tokens(io.StringIO(text).readline)
    return sorted({t.start[0] for t in toks if t.type == tokenize.OP and t.string == ";"})


def test_lines_are_short_and_single_statements():
    bad = {}
    for p in sorted(PKG.glob("*.py")):
        if p.stem in SKIP: continue
        text = p.read_text()
        found = dict(long=long_lines(text), semicolons=semicolon_lines(text))
        if any(found.values()): bad[p.name] = {k: v for k, v in found.items() if v}
    assert not bad, f"lines over 120 characters or `;` chains (fix the notebook, split by idea): {bad}"


def test_checks_can_fail(tmp_path):
    "The parsers see what they look for (a check that sees nothing would always pass)."
    assert "branch_stage" in imports("bench") and "model" in imports("synthesize") and "core" in imports("gaussians")
    text = ('__all__ = ["' + "a" * 130 + '",\n    "b"]\nx = 1; y = "; in a string"  # ; in a comment\n'
            + "z" * 121 + "\n")
    assert long_lines(text) == [4] and semicolon_lines(text) == [3]
    assert long_lines("# " + "Δ" * 60 + "\n") == [1]                              # 60 characters, 122 bytes

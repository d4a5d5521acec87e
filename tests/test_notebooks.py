"""Light notebooks and complete module docstrings.

Limits of the saved notebooks (the "light notebooks" issue): one cell's saved outputs, JSON-serialised, at most 300 kB;
one notebook at most 1 MB; all of nbs/*.ipynb together at most 6 MB (kB = 1000 bytes, MB = 10^6 bytes). Plots that only
need a picture are saved as small PNG/JPEG images (see the notes on shrinking outputs in the failure messages).

Module docstrings: nbdev 2.x writes the module docstring from the *first line* of the `> ` summary in the notebook's
title cell (`nbdev.maker._retr_mdoc`), so a summary that wraps onto a second `> ` line is cut mid-sentence. Every
module of talkinggs/ must start with a docstring that is one complete sentence.
"""
import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS, LIB = ROOT / "nbs", ROOT / "talkinggs"
MAX_OUTPUT, MAX_NB, MAX_TOTAL = 300_000, 1_000_000, 6_000_000   # bytes
NOT_MODULES = {"_modidx.py", "__init__.py", "__main__.py"}

NOTEBOOKS = sorted(NBS.glob("*.ipynb"))
MODULES = sorted(p for p in LIB.glob("*.py") if p.name not in NOT_MODULES)


def _kb(n: int) -> str: return f"{n / 1000:,.0f} kB"


def _first_line(cell) -> str:
    src = cell.get("source", "")
    src = "".join(src) if isinstance(src, list) else src
    return (src.strip().splitlines() or [""])[0][:60]


def output_sizes(path: Path) -> list[tuple[int, str, str, int]]:
    "(cell index, cell id, first source line, bytes of the JSON-serialised outputs) for every code cell with outputs."
    nb = json.loads(path.read_text(encoding="utf-8"))
    return [(i, c.get("id", "?"), _first_line(c), len(json.dumps(c["outputs"], ensure_ascii=False).encode("utf-8")))
            for i, c in enumerate(nb["cells"]) if c.get("outputs")]


def test_found_notebooks_and_modules():
    assert NOTEBOOKS, f"no notebooks in {NBS}"
    assert MODULES, f"no modules in {LIB}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_saved_outputs_small(path):
    big = [(i, cid, line, n) for i, cid, line, n in output_sizes(path) if n > MAX_OUTPUT]
    if big: pytest.fail(
        f"nbs/{path.name}: {len(big)} cell(s) with saved outputs over {_kb(MAX_OUTPUT)} (cells counted from 0):\n"
        + "\n".join(f"  cell {i} (id {cid}, `{line}`): outputs {_kb(n)}" for i, cid, line, n in big)
        + "\nSave a picture instead of an interactive figure (plotly embeds all of plotly.js), and a downscaled "
          "JPEG (photos) or palette PNG (plots) instead of a full-size retina PNG.", pytrace=False)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_small(path):
    n = path.stat().st_size
    if n > MAX_NB:
        worst = sorted(output_sizes(path), key=lambda r: -r[3])[:3]
        pytest.fail(f"nbs/{path.name} is {_kb(n)} > {_kb(MAX_NB)}; its largest saved outputs: "
                    + "; ".join(f"cell {i} (id {cid}) {_kb(s)}" for i, cid, _, s in worst), pytrace=False)


def test_all_notebooks_small():
    sizes = {p.name: p.stat().st_size for p in NOTEBOOKS}
    total = sum(sizes.values())
    top = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
    if total > MAX_TOTAL:
        pytest.fail(f"nbs/*.ipynb together are {total / 1e6:.2f} MB > {MAX_TOTAL / 1e6:.0f} MB; largest: "
                    + ", ".join(f"{k} {_kb(v)}" for k, v in top), pytrace=False)


# --- module docstrings ------------------------------------------------------------------------------------------------
_ABBREV = ("e.g.", "i.e.", "cf.", "vs.", "approx.", "Fig.", "Eq.", "No.")
_PAIRS = (("(", ")"), ("[", "]"), ("{", "}"))


def _source_notebook(py: Path) -> Path | None:
    "The notebook a module is exported from, read from nbdev's `File to edit:` header."
    m = re.search(r"File to edit: (\S+?\.ipynb)", py.read_text(encoding="utf-8")[:2000])
    return (py.parent / m.group(1)).resolve() if m else None


def _summary_lines(nb_path: Path) -> list[str]:
    "The `> ` lines of the notebook's title cell (the first markdown cell starting with `# `), as nbdev reads them."
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    for c in nb["cells"]:
        src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
        if c["cell_type"] == "markdown" and src.startswith("# "):
            return [l for l in src.splitlines() if l.startswith(">")]
    return []


def docstring_problems(doc: str | None) -> list[str]:
    "Why `doc` is not one complete sentence (empty list: it is)."
    if not doc or not doc.strip(): return ["no module docstring"]
    d, errs = doc.strip(), []
    if "\n" in d: errs.append("spans several lines (nbdev writes one line)")
    if not d.endswith("."): errs.append(f"does not end with '.' (ends with {d[-25:]!r}: cut mid-sentence?)")
    elif d.endswith(_ABBREV): errs.append("ends with an abbreviation, not the end of a sentence")
    for a, b in _PAIRS:
        if d.count(a) != d.count(b): errs.append(f"unbalanced {a}{b}: cut mid-sentence?")
    if d.count("`") % 2: errs.append("unbalanced backticks")
    if d.count("**") % 2: errs.append("unbalanced ** (bold)")
    # one sentence: no sentence end followed by a capitalised word inside (abbreviations excepted)
    for m in re.finditer(r"[.!?]\s+(?=[A-Z])", d):
        if not d[:m.start() + 1].endswith(_ABBREV):
            errs.append(f"more than one sentence (break after {d[max(0, m.start() - 20):m.start() + 1]!r})"); break
    return errs


def test_docstring_checker():
    assert docstring_problems("The conventions every other chapter relies on, written once and tested once.") == []
    assert docstring_problems("Read any video (25 fps, 512², e.g. from `imageio-ffmpeg`) and normalise it.") == []
    for cut in ("A small bundle adjustment in torch: one canonical 3D face shape, a rotation and translation per frame "
                "and one",
                "The measurements (PSNR, PSNR inside the head, SSIM on the face box, LPIPS, mouth", None, "",
                "Loss, optimiser and schedule. Adaptive density control."):
        assert docstring_problems(cut), cut


@pytest.mark.parametrize("py", MODULES, ids=lambda p: p.name)
def test_module_docstring_is_one_sentence(py):
    doc = ast.get_docstring(ast.parse(py.read_text(encoding="utf-8")), clean=False)
    errs = docstring_problems(doc)
    nb = _source_notebook(py)
    if nb is not None and nb.exists():
        summ = _summary_lines(nb)
        if len(summ) > 1:
            errs.append(f"the `> ` summary of nbs/{nb.name} spans {len(summ)} lines and nbdev exports only the first: "
                        "put the summary on one line (one sentence) and move the rest into a paragraph below")
        where = f"talkinggs/{py.name} (from nbs/{nb.name})"
    else: where = f"talkinggs/{py.name}"
    if errs: pytest.fail(f"{where}: module docstring {doc!r}\n  " + "\n  ".join(errs), pytrace=False)

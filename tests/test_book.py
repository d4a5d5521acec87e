"""The book refers only to what its reader can see: no project-internal documents, issues, sessions or notes of the
people who wrote it (they live outside the repository). Data paths such as `../shared/data` are fine: the code itself
searches them (chapter 10)."""
import json, re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "nbs").glob("*.ipynb")) + [ROOT / "README.md"]
# words that point at something outside the book (the developers' notes, issue tracker and work sessions)
HIDDEN = re.compile(r"closing notes?|design notes?|DESIGN\.md|FIDELITY\.md|\bissues?\b|\bsessions?\b", re.I)


def _text(path: Path) -> list[tuple[str, str]]:
    "(where, text) of a page: every cell of a notebook (sources only), or the whole markdown file."
    if path.suffix == ".md": return [(path.name, path.read_text())]
    cells = json.loads(path.read_text())["cells"]
    return [(f"{path.name} cell {k}", "".join(c["source"])) for k, c in enumerate(cells)]


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_no_reference_a_reader_cannot_see(path):
    found = [f"{where}: ...{text[max(0, m.start() - 40):m.end() + 40]!r}..."
             for where, text in _text(path) for m in HIDDEN.finditer(text)]
    assert not found, "the book points at something its reader cannot see:\n" + "\n".join(found)


def test_the_check_catches_what_it_should():
    assert HIDDEN.search("the issue's bar") and HIDDEN.search("see DESIGN.md") and HIDDEN.search("a GPU session")
    assert not HIDDEN.search("../shared/data beside the checkout") and not HIDDEN.search("the tissue")


# the core path of the book (rendering -> fields -> the model -> training -> synthesis -> the capstone)
CORE = ["00_core", "01_gaussians", "02_rasterize", "03_static_fit", "15a_phones", "20_hashgrid", "21_audio_encoder",
        "22_motion_field", "23_fusion", "24_sampling", "25_model", "30_train", "31_synthesize", "35_tutorial"]


def _bibliography_names() -> list[str]:
    "The short names in the first column of the bibliography's tables."
    cells = json.loads((ROOT / "nbs" / "bibliography.ipynb").read_text())["cells"]
    rows = [line for c in cells for line in "".join(c["source"]).splitlines() if line.startswith("| ")]
    names = [r.split("|")[1].strip().strip("*") for r in rows]
    return [n for n in names if n and n not in ("short name", "addition")]


@pytest.mark.parametrize("name", CORE)
def test_core_chapter_has_exercises_and_cites_a_source(name):
    cells = json.loads((ROOT / "nbs" / f"{name}.ipynb").read_text())["cells"]
    prose = ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]
    ex = [p for p in prose if p.startswith("## Exercises")]
    assert ex, f"{name} has no '## Exercises' section"
    tasks = re.findall(r"^\d+\. ", ex[0], re.M)
    assert 2 <= len(tasks) <= 4, f"{name}: {len(tasks)} exercises (2 to 4 wanted)"
    names = _bibliography_names()
    assert len(names) >= 20, names                                   # the parse found the tables
    cited = [n for n in names if any(n in p for p in prose)]
    assert cited, f"{name} cites nothing from the bibliography ({', '.join(names)})"


CHAPTERS = sorted((ROOT / "nbs").glob("[0-9]*.ipynb"))


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_opens_with_what_it_needs_and_gives(path):
    cells = json.loads(path.read_text())["cells"]
    prose = ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"][:3]
    opening = [p for p in prose if p.startswith("**Needs:**")]
    assert opening, f"{path.stem}: none of its first three markdown cells starts with '**Needs:**'"
    assert re.search(r"^\*\*After it you can:\*\* \S", opening[0], re.M), \
        f"{path.stem}: its opening has no line starting with '**After it you can:**'"


def _uncited_equations(text: str, names: list[str]) -> bool:
    "True when a markdown cell shows a display equation but names no source for it."
    return "$$" in text and not re.search(r"\bours\b", text, re.I) and not any(n in text for n in names)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_display_equation_is_cited_where_used(path):
    names = _bibliography_names()
    cells = json.loads(path.read_text())["cells"]
    bad = [k for k, c in enumerate(cells)
           if c["cell_type"] == "markdown" and _uncited_equations("".join(c["source"]), names)]
    assert not bad, f"{path.stem}: markdown cells {bad} show a display equation ($$) without naming its source " \
                    "(a short name of the bibliography, with its equation number, or 'ours')"


def test_the_citation_check_catches_what_it_should():
    names = ["3DGS", "TalkingGaussian"]
    assert _uncited_equations("$$C = \\sum c_i$$", names)
    assert not _uncited_equations("TalkingGaussian Eq. 9: $$C = a + b$$", names)
    assert not _uncited_equations("our choice (ours): $$w = 0.2$$", names)
    assert not _uncited_equations("no display equation, only $x$", names)

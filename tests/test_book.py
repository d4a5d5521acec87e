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

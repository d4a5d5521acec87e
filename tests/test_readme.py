"""README.md is generated from nbs/index.ipynb (quarto, which `nbdev_readme` needs, cannot be installed offline).
Regenerate with `python tests/test_readme.py`; this test fails when the two drift apart."""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = ("<!-- Generated from nbs/index.ipynb by `python tests/test_readme.py`: "
          "edit the notebook, not this file. -->\n\n")


def render_readme(nb_path: Path = ROOT / "nbs" / "index.ipynb") -> str:
    "Markdown of the index notebook: markdown cells as they are, code cells (without `#|` directives) fenced."
    cells = json.loads(nb_path.read_text())["cells"]
    parts = []
    for c in cells:
        src = "".join(c["source"])
        if c["cell_type"] == "markdown":
            parts.append(src.strip())
        elif c["cell_type"] == "code":
            if re.search(r"^#\|\s*(hide|export)", src, re.M):
                continue
            code = "\n".join(l for l in src.splitlines() if not l.startswith("#|")).strip()
            if code: parts.append(f"```python\n{code}\n```")
    return HEADER + "\n\n".join(parts) + "\n"


def test_readme_in_sync_with_index():
    assert (ROOT / "README.md").read_text() == render_readme(), "README.md is stale: run `python tests/test_readme.py`"


def test_readme_names_the_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for cmd in ('pip install -e ".[dev]"', "nbdev_test --n_workers 2 && python -m pytest -q tests"):
        assert cmd in readme and cmd in ci, cmd


if __name__ == "__main__":
    (ROOT / "README.md").write_text(render_readme())
    print("wrote README.md")

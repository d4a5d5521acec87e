"""Chapter 35's part A, the five steps on a CPU, stays among the cells `nbdev_test` runs; its clips come through
chapter 10's `get_sample`, and the full-size cells that need CUDA stay marked `gpu`."""
import json, re
from pathlib import Path

NB = Path(__file__).resolve().parents[1] / "nbs" / "35_tutorial.ipynb"
SKIPPED = re.compile(r"^#\|\s*(gpu|slow|eval:\s*false)\b", re.M)   # flags that keep a cell out of plain nbdev_test


def _code() -> list[str]:
    "Sources of the chapter's code cells."
    return ["".join(c["source"]) for c in json.loads(NB.read_text())["cells"] if c["cell_type"] == "code"]


def test_cpu_path_runs_unflagged():
    run = "\n".join(s for s in _code() if not SKIPPED.search(s))
    for step in ("preprocess(", "PreprocessConfig(size=128)", "train(", 'device="cpu"', "evaluate(", "render_video("):
        assert step in run, f"part A lost {step!r} from the cells nbdev_test runs"
    assert len(re.findall(r"^\s*assert ", run, re.M)) >= 4, "part A's checks are gone"


def test_cuda_cells_are_flagged():
    for s in _code():
        if '"cuda"' in s or "cuda." in s: assert re.search(r"^#\|\s*gpu\b", s, re.M), s.splitlines()[0]


def test_samples_through_get_sample():
    code = "\n".join(_code())
    assert "get_sample(" in code and "find_sample" not in code

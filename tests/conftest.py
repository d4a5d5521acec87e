"""pytest configuration: the `gpu` marker skips (with a reason) where CUDA or gsplat is missing."""
import hashlib, json, shutil
from pathlib import Path

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (and gsplat for the fast path)")
    config.addinivalue_line("markers", "slow: takes more than ~30 s on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run on a GPU machine (CI has none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    "One intra-op torch thread for a test module: small models stall when threads oversubscribe shared CI cores."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def folder_state(root: Path) -> dict:
    "Every path under `root` (folders too) with a SHA-256 of each file's bytes: to tell whether anything changed."
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="session")
def clip64_once(tmp_path_factory):
    """The committed synthetic talking head preprocessed at 64x64, once per test session (~25 s on 2 cores).
    Shared and read-only: at the end of the session it fails if any test added, removed or changed a file in it
    (a test that changes files takes `clip64_copy`)."""
    from talkinggs.preprocess import PreprocessConfig, preprocess
    from talkinggs.samples import repo_root
    clip = preprocess(repo_root() / "data_samples" / "synthetic_head" / "video.mp4",
                      tmp_path_factory.mktemp("synthetic_once") / "clip64", cfg=PreprocessConfig(size=64),
                      progress=False)
    before = folder_state(clip)
    yield clip
    after = folder_state(clip)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test changed the shared clip64_once (use clip64_copy): {changed[:10]}"


@pytest.fixture
def clip64_copy(clip64_once, tmp_path_factory):
    "A private copy of the preprocessed synthetic head, for a test that may change its files: a function to call."
    def copy(name: str = "clip64"):
        return Path(shutil.copytree(clip64_once, tmp_path_factory.mktemp("synthetic") / name))
    return copy


@pytest.fixture
def cli(capsys):
    "`talkinggs ARGV` in this process, as a function of ARGV: its exit status, stdout and stderr."
    from talkinggs.cli import main

    def run(argv) -> tuple[int, str, str]:
        try:
            main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture
def fake_clip(tmp_path) -> Path:
    "A data folder that passes every check before training (meta.json of a 5 s clip at 25 fps) but has no frames."
    d = tmp_path / "fake"
    d.mkdir()
    meta = dict(n_frames=126, fps=25.0, width=64, height=64, sample_rate=16000,
                split=dict(train=[0, 114], test=[114, 126]))
    (d / "meta.json").write_text(json.dumps(meta))
    return d

"""GSTalker and GaussianTalker (chapters 22a, 22b) in the method slot: each trains, renders and evaluates through the
same functions and command line as TalkingGaussian, on the committed synthetic head at 64x64 on the CPU.
Quality is not the point here (a few iterations); the GPU comparison of the three methods is the results chapter's."""
import json, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch

from talkinggs.samples import repo_root
from talkinggs.train import cpu_demo_train_config, train
from talkinggs.model import load_head, model_store, METHODS
from talkinggs.synthesize import Renderer, FastRenderer, render_video
from talkinggs.evaluate import evaluate

HEAD = repo_root() / "data_samples" / "synthetic_head"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip(clip64_once, tmp_path_factory):
    "A copy of the session's preprocessed synthetic head (conftest.py)."
    return Path(shutil.copytree(clip64_once, tmp_path_factory.mktemp("methods") / "clip64"))


@pytest.mark.parametrize("method", ["gstalker", "gaussiantalker"])
def test_method_trains_renders_evaluates(clip, tmp_path, method):
    run = tmp_path / method
    # GSTalker's torso; the other: its own (none)
    cfg = cpu_demo_train_config(method=method, face_iters=40, fused_iters=4, face_points=300, log_every=5,
                                test_pose_steps=10,   # evaluation's pose correction: 10 steps, not 150 (CI time)
                                torso_iters=30 if method == "gstalker" else None)
    train(clip, run, cfg, device="cpu", progress=False)
    assert (run / "torso.pt").is_file() == (method == "gstalker")
    head = load_head(run / "model.pt")
    assert head.cfg.method == method and [b.name for b in head.branches] == ["face"] and head.face.mask == "head"
    assert json.loads((run / "config.json").read_text())["train"]["method"] == method
    store = model_store(head, clip)
    ref, fast = Renderer(head), FastRenderer(head)
    bg = store.frame(0)["torso_bg"]
    for i in (0, store.n - 1):
        a = ref.frame(store.audio, i, store.viewmats[i], store.Ks[i], store.expr[i], bg)
        b = fast.frame(store.audio, i, store.viewmats[i], store.Ks[i], store.expr[i], bg)
        assert (a["image"] - b["image"]).abs().max() < 1e-6 and "mouth" not in a
    rep = evaluate(run, device="cpu", video=False, progress=False)
    assert rep["summary"]["psnr_head"] > 5 and (run / "eval" / "report.json").exists()
    # GSTalker: shoulders from its torso Gaussians
    out = render_video(run, tmp_path / f"{method}.mp4", device="cpu", max_frames=3, progress=False,
                       background="model" if method == "gstalker" else "torso")
    assert out["frames"] == 3 and (tmp_path / f"{method}.mp4").stat().st_size > 0
    if method == "gaussiantalker":
        with pytest.raises(FileNotFoundError, match="no torso.pt"):
            render_video(run, tmp_path / "x.mp4", background="model", device="cpu")
    from talkinggs.traces import model_traces                       # the trace explorer's data: what the method moves
    tr = model_traces(head, store, frames=[0, 1, 2], size=32, n_other=50)
    assert tr.d_means.shape[:2] == (3, len(tr.means)) and (tr.branch == 0).all() and tr.regions["teeth"].sum() == 0
    # the one method whose motion changes colour and opacity
    if method == "gaussiantalker":
        with torch.no_grad():
            d = head.face.motion(head.face.splats["means"], head.audio_code(head.face, store.audio, 5), store.expr[5],
                                 store.viewmats[5])
        assert d["d_sh0"].abs().max() > 0 and d["d_opacities"].abs().max() > 0


def test_cli_method(clip, tmp_path):
    r = subprocess.run([sys.executable, "-m", "talkinggs", "train", str(clip), "--out", str(tmp_path / "r"),
                        "--method", "nerf", "--device", "cpu", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown method" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r").exists()
    assert {"talkinggaussian", "gstalker", "gaussiantalker"} <= set(METHODS)


def test_cli_train_config(clip, tmp_path):
    "`talkinggs train --config`: TrainConfig fields beyond the named options reach the run; a wrong one is one line."
    def train_cli(*extra):
        return subprocess.run([sys.executable, "-m", "talkinggs", "train", str(clip), "--out", str(tmp_path / "r"),
                               "--device", "cpu", "--quiet", *extra], capture_output=True, text=True)
    r = train_cli("--config", "pose_iter=5")
    assert r.returncode == 2 and "--config takes name=value pairs" in r.stderr and "Traceback" not in r.stderr
    r = train_cli("--config", "pose_iters=many")
    assert r.returncode == 2 and "is not of type int" in r.stderr and not (tmp_path / "r").exists()
    r = train_cli("--preset", "custom", "--face_iters", "4", "--mouth_iters", "2", "--fused_iters", "2", "--config",
                  "pose_refine=false,face_points=100,mouth_points=40,sh_degree=0,lpips_gamma=0,ssim_lambda=0.1,"
                  "torso_iters=0")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())["train"]
    assert (cfg["face_points"] == 100 and cfg["ssim_lambda"] == 0.1 and cfg["pose_refine"] is False
            and cfg["face_iters"] == 4)
    assert cfg["torso_iters"] == 0 and not (tmp_path / "r" / "torso.pt").exists()   # an optional int field, typed

"""Bit-for-bit fingerprint of training, rendering and evaluation on the synthetic head (CPU): the check of a refactor.

    PYTHONPATH=/copy/of/the/package/before python tests/fingerprint.py OUT_BEFORE
    PYTHONPATH=/copy/of/the/package/after  python tests/fingerprint.py OUT_AFTER
    diff OUT_BEFORE/fingerprint.json OUT_AFTER/fingerprint.json

Five runs (the demo settings; stage 0 with joint cameras; GSTalker with its torso; GaussianTalker; random background
without incremental sampling): hashes of every tensor of init.pt, model.pt, torso.pt and each checkpoint (optimiser
moments, random states), metrics.csv (values, not timings), the resolved config, decoded video frames and evaluation
reports with their renders and error maps. Names of modules before and after a rename are both tried; a module found
outside PYTHONPATH's first folder (an editable install of another checkout) is not used. About 4 minutes on a CPU."""
import hashlib, json, sys, csv, importlib
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)

import os
PKG = os.environ["PYTHONPATH"].split(":")[0]   # the package under test (the editable install must not leak in)
def imp(names, attr):
    for n in names:
        try:
            m = importlib.import_module(n)
            if not m.__file__.startswith(PKG): continue
            if hasattr(m, attr): return getattr(m, attr)
        except ImportError: pass
    raise ImportError(attr)
repo_root = imp(["talkinggs.samples", "talkinggs.data"], "repo_root")
preprocess = imp(["talkinggs.preprocess", "talkinggs.dataset"], "preprocess")
PreprocessConfig = imp(["talkinggs.preprocess", "talkinggs.dataset"], "PreprocessConfig")
train = imp(["talkinggs.train"], "train")
cpu_demo = imp(["talkinggs.train_config", "talkinggs.run", "talkinggs.train"], "cpu_demo_train_config")
render_video = imp(["talkinggs.synthesize"], "render_video")
evaluate = imp(["talkinggs.evaluate", "talkinggs.synthesize"], "evaluate")
load_checkpoint = imp(["talkinggs.bookkeeping", "talkinggs.runs"], "load_checkpoint")
HEAD = repo_root() / "data_samples" / "synthetic_head"
data = out / "clip64"
if not (data / "meta.json").exists():
    preprocess(HEAD / "video.mp4", data, cfg=PreprocessConfig(size=64), progress=False)

def h(x):
    if isinstance(x, torch.Tensor):
        return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    if isinstance(x, dict): return {k: h(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
    if isinstance(x, (list, tuple)): return [h(v) for v in x]
    return repr(x)[:200]

def files(run):
    fp = {}
    for name in ("init.pt", "model.pt", "torso.pt", "face.ckpt.pt", "mouth.ckpt.pt", "fused.ckpt.pt", "torso.ckpt.pt"):
        p = run / name
        if p.exists():
            c = load_checkpoint(p, "cpu")
            fp[name] = (h({k: v for k, v in c.items() if k not in ("versions", "time", "created")})
                        if isinstance(c, dict) else h(c))
    if (run / "metrics.csv").exists():
        rows = list(csv.DictReader(open(run / "metrics.csv")))
        vals = lambda rs: [{k: (v if k == "stage" else float(v)) for k, v in r.items() if k != "seconds"} for r in rs]
        fp["metrics"] = hashlib.sha256(
            json.dumps(vals([r for r in rows if r["stage"] != "torso"])).encode()).hexdigest()[:16]
        fp["metrics_n"] = len([r for r in rows if r["stage"] != "torso"])
        fp["metrics_torso_n"] = len([r for r in rows if r["stage"] == "torso"]) or None
    cfg = json.loads((run / "config.json").read_text())
    fp["config_train"] = cfg["train"]
    return fp

def report(folder):
    rep = json.loads((folder / "report.json").read_text())
    keep = {k: rep[k] for k in ("summary", "per_frame", "frames", "head_share") if k in rep}
    pngs = sorted((folder / "renders").glob("*.png"))
    import cv2
    keep["renders"] = hashlib.sha256(b"".join(cv2.imread(str(p)).tobytes() for p in pngs)).hexdigest()[:16]
    keep["errors"] = hashlib.sha256(b"".join(cv2.imread(str(p)).tobytes()
                                             for p in sorted((folder / "errors").glob("*.png")))).hexdigest()[:16]
    return keep

def video_frames(path):
    import imageio_ffmpeg
    r = imageio_ffmpeg.read_frames(str(path)); meta = next(r)
    return hashlib.sha256(b"".join(bytes(f) for f in r)).hexdigest()[:16]

FP = {}
cases = {
 "demo": dict(face_iters=300, mouth_iters=40, fused_iters=20),
 "stage0_joint": dict(face_iters=80, mouth_iters=20, fused_iters=6, pose_refine=True, pose_iters=40, pose_joint=True,
                      face_points=300, mouth_points=60, log_every=5),
 "gstalker": dict(method="gstalker", face_iters=60, fused_iters=6, face_points=300, log_every=5, torso_iters=30),
 "gaussiantalker": dict(method="gaussiantalker", face_iters=60, fused_iters=6, face_points=300, log_every=5),
 "randombg_nois": dict(face_iters=60, mouth_iters=20, fused_iters=6, face_points=300, mouth_points=60, random_bg=True,
                       incremental_sampling=False, log_every=5),
}
only = sys.argv[2].split(",") if len(sys.argv) > 2 else list(cases)
for name in only:
    run = out / f"run_{name}"
    import shutil; shutil.rmtree(run, ignore_errors=True)
    cfg = cpu_demo(**cases[name])
    train(data, run, cfg, device="cpu", progress=False)
    fp = files(run)
    if name == "demo":
        render_video(run, out / "demo.mp4", audio=HEAD / "speech.wav", device="cpu", progress=False)
        fp["video_new_audio"] = video_frames(out / "demo.mp4")
        rep = evaluate(run, device="cpu", refine=False, progress=False, video=False)
        fp["eval_tracked"] = report(run / "eval_tracked")
        rep = evaluate(run, device="cpu", refine=True, progress=False, video=False)
        fp["eval"] = report(run / "eval")
        rep = evaluate(run, device="cpu", split="train", progress=False, video=False, train_frames=8)
        fp["eval_train"] = report(run / "eval_train")
    if name == "gstalker":
        render_video(run, out / "gst.mp4", device="cpu", progress=False, background="model", max_frames=12)
        fp["video_model_bg"] = video_frames(out / "gst.mp4")
        evaluate(run, device="cpu", refine=False, progress=False, video=False)
        fp["eval_tracked"] = report(run / "eval_tracked")
    if name == "gaussiantalker":
        render_video(run, out / "gt.mp4", device="cpu", progress=False, max_frames=12)
        fp["video_own_audio"] = video_frames(out / "gt.mp4")
    # resume: interrupt-free resume of a finished run with --resume must change nothing
    FP[name] = fp
    (out / "fingerprint.json").write_text(json.dumps(FP, indent=1, sort_keys=True))
    print(name, "done", flush=True)

"""Tests of chapters 31 and 32 on the CPU: rendering with new audio, streaming, evaluation and the run-folder errors,
on a briefly trained synthetic head (64x64). Quality is not the point here (tests/test_train.py checks learning)."""
import json, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch

from talkinggs.samples import repo_root
from talkinggs.clip import FrameStore
from talkinggs.train import train, cpu_demo_train_config
from talkinggs.synthesize import (Renderer, load_run, render_video, stream_frames, drive_track,
                                  audio_features, background_for)
from talkinggs.evaluate import evaluate
from talkinggs.core import to_uint8
from talkinggs.video import probe_video, iter_frames

HEAD = repo_root() / "data_samples" / "synthetic_head"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(clip64_once, tmp_path_factory):
    "A synthetic clip at 64x64 (a copy of the session's, conftest.py) and a run trained a few iterations per stage."
    d = tmp_path_factory.mktemp("synth")
    data = Path(shutil.copytree(clip64_once, d / "clip64"))
    cfg = cpu_demo_train_config(face_iters=60, mouth_iters=20, fused_iters=6, face_points=400, mouth_points=80,
                                test_pose_steps=10)   # evaluation's pose correction: 10 steps, not 150 (CI time)
    train(data, d / "run", cfg, device="cpu", progress=False)
    return data, d / "run"


def test_load_run_errors(tmp_path, trained):
    with pytest.raises(FileNotFoundError, match="no model.pt"):
        load_run(tmp_path, "cpu")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="--resume"):
        load_run(tmp_path, "cpu")
    data, run = trained
    with pytest.raises(FileNotFoundError, match="data folder"):
        load_run(run, "cpu", data=tmp_path / "nowhere")


def test_drive_track_and_backgrounds(trained):
    data, run = trained
    store = FrameStore(data, "cpu", progress=False)
    n_train = len(store.train_idx)
    tr = drive_track(store, 3 * n_train)
    assert len(tr) == 3 * n_train and set(tr) <= set(store.train_idx.tolist())
    assert (np.abs(np.diff(tr)) == 1).all()                       # no jump: forwards, then backwards, ...
    for kind in ("torso", "plate", "white", "black"):
        bg = background_for(store, int(tr[0]), kind)
        assert bg.min() >= 0 and bg.max() <= 1
    with pytest.raises(ValueError, match="background"):
        background_for(store, 0, "green")


def test_render_with_new_audio_any_length(trained, tmp_path):
    "A new audio file longer than the clip: one frame per 1/25 s, audio muxed in, poses looped."
    data, run = trained
    meta = json.loads((data / "meta.json").read_text())
    sr = meta["sample_rate"]
    t = np.arange(int(7.0 * sr)) / sr                              # 7 s, longer than the ~5 s clip
    wav = (0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 1.5 * t) > 0)).astype(np.float32)
    from scipy.io import wavfile
    wavfile.write(tmp_path / "new.wav", sr, (wav * 32767).astype(np.int16))
    feats, _ = audio_features(tmp_path / "new.wav", meta)
    assert feats.shape[0] == 175 and feats.shape[1:] == (16, meta["config"]["audio_dim"])
    r = render_video(run, tmp_path / "out.mp4", audio=tmp_path / "new.wav", device="cpu", progress=False)
    assert r["frames"] == 175
    info = probe_video(tmp_path / "out.mp4")
    assert (info.width, info.height) == (64, 64) and info.audio_codec is not None
    assert abs(info.duration - 7.0) < 0.2
    assert len(list(iter_frames(tmp_path / "out.mp4", 25.0))) == 175
    assert not list(tmp_path.glob(".*"))                           # no temporary files left


def test_stream_matches_offline(trained):
    "Frames streamed from 0.1 s audio chunks equal offline rendering up to the log-mel floor difference."
    data, run = trained
    head, data, _ = load_run(run, "cpu")
    store = FrameStore(data, "cpu", progress=False)
    meta = store.meta
    feats, wav = audio_features(data / "audio.wav", meta)
    n = 40
    wav = wav[: int(n * meta["sample_rate"] / meta["fps"])]
    feats = torch.from_numpy(audio_features(wav, meta)[0])
    r = Renderer(head, backend="torch")
    track = drive_track(store, n)
    offline = [to_uint8(r.frame(feats, t, store.viewmats[int(i)], store.Ks[int(i)], store.expr[int(i)],
                                background_for(store, int(i)))["image"]) for t, i in enumerate(track)]
    chunks = np.array_split(wav, len(wav) // 1600)
    streamed = list(stream_frames(r, store, chunks))
    assert len(streamed) == n
    err = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(streamed, offline)]
    assert max(err) < 2.0, err                                     # mean absolute difference in 8-bit levels


def test_evaluate_reports(trained):
    data, run = trained
    rep = evaluate(run, device="cpu", progress=False)
    s = rep["summary"]
    assert {"psnr", "psnr_head", "ssim_face"} <= set(s)
    from talkinggs.clip import FrameStore
    from talkinggs.core import psnr
    import cv2
    store = FrameStore(data, "cpu", progress=False)
    i = rep["frames"][0]                                           # recomputed from the saved render and the frame
    render = torch.from_numpy(
        cv2.imread(str(run / "eval" / "renders" / f"{i:06d}.png"))[..., ::-1].copy()).float() / 255
    assert psnr(render, store.frame(i)["image"]).item() == pytest.approx(rep["per_frame"][0]["psnr"], abs=0.05)
    assert s["psnr"] == pytest.approx(np.mean([r["psnr"] for r in rep["per_frame"]]))
    assert len(rep["per_frame"]) == len(rep["frames"]) == 12
    saved = json.loads((run / "eval" / "report.json").read_text())  # strict JSON (no NaN)
    assert saved["summary"]["psnr"] == pytest.approx(s["psnr"])
    assert len(list((run / "eval" / "renders").glob("*.png"))) == 12
    assert probe_video(run / "eval" / "side_by_side.mp4").width == 3 * 64
    cams = run / "test_cameras.pt"                                 # the corrected test cameras, made once
    assert cams.is_file()
    stamp = cams.stat().st_mtime_ns
    import talkinggs.evaluate as ev
    def refit(*a, **k): raise AssertionError("the static evaluation fitted the test cameras again")
    orig, ev.refine_cameras = ev.refine_cameras, refit
    try: st = evaluate(run, device="cpu", static=True, video=False, progress=False)
    finally: ev.refine_cameras = orig
    assert (run / "eval_static" / "report.json").exists() and st["static"] and cams.stat().st_mtime_ns == stamp
    saved = torch.load(cams)
    assert saved["key"]["frames"] == rep["frames"] and saved["viewmats"].shape == (12, 4, 4)
    assert saved["key"]["steps"] == 10                            # the run's test_pose_steps reached the fit


def test_evaluate_diagnosis(trained, monkeypatch):
    "Per-region PSNR, the head's share, error maps, LMD named; the train split; report.json survives a broken encoder."
    import talkinggs.evaluate as ev
    from talkinggs.metrics import REGIONS
    data, run = trained
    class NoEncoder:                                          # as with imageio-ffmpeg missing: fails when opened
        def __init__(self, *a, **k): raise RuntimeError("no ffmpeg here")
    monkeypatch.setattr(ev, "VideoWriter", NoEncoder)
    rep = evaluate(run, device="cpu", progress=False, split="train", train_frames=10)
    folder = run / "eval_train"
    train_idx = FrameStore(data, "cpu", progress=False).train_idx
    assert rep["split"] == "train" and len(rep["frames"]) == 10 and set(rep["frames"]) <= set(train_idx.tolist())
    assert "no ffmpeg here" in rep["video_note"] and not (folder / "side_by_side.mp4").exists()
    saved = json.loads((folder / "report.json").read_text())
    assert (saved["video_note"] == rep["video_note"]
            and saved["summary"]["psnr_head"] == pytest.approx(rep["summary"]["psnr_head"]))
    for k in REGIONS:                                         # every region scored, in dB
        assert f"psnr_{k}" in rep["per_frame"][0]
    s = rep["summary"]
    assert s["psnr_outside_head"] > s["psnr_head"]            # outside the head the composite is the ground truth
    assert 0.2 < rep["head_share"] < 0.9 and "40 lip-contour points" in rep["lmd_set"]
    assert len(list((folder / "errors").glob("*.png"))) == 10 and (folder / "error_mean.png").exists()
    # the share ties the PSNRs: the frame's squared error is the head's and the outside's, weighted by their shares
    share, mse = rep["head_share"], lambda db: 10 ** (-db / 10)
    mixed = -10 * np.log10(share * mse(s["psnr_head"]) + (1 - share) * mse(s["psnr_outside_head"]))
    assert s["psnr"] == pytest.approx(mixed, abs=0.5), (s["psnr"], mixed)   # means over frames: not exact
    with pytest.raises(ValueError, match="split"): evaluate(run, device="cpu", progress=False, split="val")
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(FileNotFoundError): evaluate(run.parent / "no_such_run", device="cpu", progress=False)
    assert not (run.parent / "no_such_run").exists() and sorted(p.name for p in run.iterdir()) == before


def test_cli_train_refuses_existing_run(trained):
    data, run = trained
    r = subprocess.run(["talkinggs", "train", str(data), "--out", str(run), "--device", "cpu", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("talkinggs train: error:") and "--resume" in r.stderr


def test_demo_command_runs_the_whole_job(trained, tmp_path):
    "`python -m talkinggs demo`: train, render and evaluate the bundled synthetic head (data preprocessed already)."
    import shutil, subprocess, sys
    data, _ = trained
    shutil.copytree(data, tmp_path / "demo" / "data")                 # the demo's own step 1, done by the fixture
    r = subprocess.run([sys.executable, "-m", "talkinggs", "demo", "--out", str(tmp_path / "demo"),
                        "--face_iters", "20", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    info = probe_video(tmp_path / "demo" / "demo.mp4")
    assert info.audio_codec == "aac" and info.duration > 1.0                    # driven by its speech, with sound
    rep = json.loads((tmp_path / "demo" / "run" / "eval_tracked" / "report.json").read_text())
    assert rep["frames"] and np.isfinite(rep["summary"]["psnr_head"])
    assert "PSNR" in r.stdout and str(tmp_path / "demo" / "demo.mp4") in r.stdout


def _fast_vs_reference(run, device: str, ends: bool = False) -> tuple[float, object]:
    """Largest |reference - fast| over images and layers (first, middle, last frame, or every tenth), and the fast
    renderer."""
    from talkinggs.synthesize import FastRenderer
    from talkinggs.model import model_store
    head, d, _ = load_run(run, device)
    store = model_store(head, d)
    ref, fast = Renderer(head), FastRenderer(head)
    bg = store.frame(0)["torso_bg"]
    worst = 0.0
    for i in (0, store.n // 2, store.n - 1) if ends else range(0, store.n, max(1, store.n // 10)):
        a = ref.frame(store.audio, i, store.viewmats[i], store.Ks[i], store.expr[i], bg)
        b = fast.frame(store.audio, i, store.viewmats[i], store.Ks[i], store.expr[i], bg)
        worst = max(worst, *((a[k] - b[k]).abs().max().item() for k in ("image", "alpha", "face", "mouth")))
    return worst, fast


def test_fast_renderer_matches_reference(trained):
    "FastRenderer gives the reference's frames on the CPU to float rounding (same operations, no graph, no gsplat)."
    worst, _ = _fast_vs_reference(trained[1], "cpu", ends=True)
    assert worst < 1e-6


@pytest.mark.gpu
def test_fast_renderer_gpu(trained):
    "On CUDA: the graph is captured, both branches go to one gsplat call, frames agree to 1e-4 (float rounding)."
    worst, fast = _fast_vs_reference(trained[1], "cuda")
    assert worst < 1e-4 and fast._g is not None and fast.one_pass


def test_bench_report(trained, tmp_path):
    "bench_report writes one JSON with the machine, versions, per-stage training rates and both renderers' speed."
    from talkinggs.bench import bench_report
    data, _ = trained
    cfg = cpu_demo_train_config(face_iters=60, mouth_iters=20, fused_iters=6, face_points=400, mouth_points=80,
                                log_every=4)
    rep = bench_report(data, tmp_path / "b", cfg=cfg, device="cpu", frames=3, repeats=2)
    back = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert back["versions"]["torch"] == torch.__version__ and back["machine"].startswith("CPU")
    assert back["train"]["stages"]["face motion"]["its"] > 0 and back["train"]["wall_s"] > 0
    assert set(rep["infer"]) >= {"reference", "fast"} and rep["infer"]["fast"]["max_abs_diff"] < 1e-6
    assert len(back["infer"]["reference"]["runs_ms"]) == 2
    r = subprocess.run([sys.executable, "-m", "talkinggs", "bench", "report", "--path", str(tmp_path / "nothing"),
                        "--out", str(tmp_path / "c"), "--video", str(tmp_path / "missing.mp4")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr


def test_a_phone_driven_model_trains_and_speaks_new_audio(trained, tmp_path):
    "audio_features='both': the clip's phones beside its log-mel drive the fields; new audio goes the same way."
    data, _ = trained
    assert (data / "phones.npy").is_file()                        # preprocessing wrote the phone windows
    cfg = cpu_demo_train_config(face_iters=20, mouth_iters=10, fused_iters=2, face_points=200, mouth_points=40,
                                audio_features="both")
    run = tmp_path / "run"
    train(data, run, cfg, device="cpu", progress=False)
    head, _, _ = load_run(run, "cpu")
    assert head.cfg.audio_features == "both" and head.cfg.feat_dim == 120
    assert (head.feat_mean[80:] == 0).all() and (head.feat_std[80:] == 1).all()   # one-hot phones kept as they are
    meta = json.loads((data / "meta.json").read_text())
    feats, _ = audio_features(data / "audio.wav", meta, "both")
    store = FrameStore(data, "cpu", progress=False, audio="both")
    same = store.audio.numpy()                                     # new audio is windowed as the clip was:
    assert np.allclose(feats[..., 80:], same[..., 80:], atol=1e-5)  # the same phones, and the same log-mel up to
    assert np.abs(feats[..., :80] - same[..., :80]).mean() < 0.05   # audio.wav's 16-bit rounding (dB, mean)
    r = render_video(run, tmp_path / "out.mp4", audio=data / "audio.wav", device="cpu", max_frames=5, progress=False)
    assert r["frames"] == 5
    with pytest.raises(ValueError, match="audio_features must be one of"):
        train(data, tmp_path / "bad", cpu_demo_train_config(audio_features="deepspeech"), device="cpu", progress=False)
    assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def tiny_hubert(tmp_path_factory) -> Path:
    "A randomly initialised HuBERT small enough for a CPU test (it knows no speech: the plumbing is what is tested)."
    transformers = pytest.importorskip("transformers", reason="the `hubert` extra (transformers) is not installed")
    d = tmp_path_factory.mktemp("tiny_hubert")
    cfg = transformers.HubertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                    conv_dim=(8,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    transformers.HubertModel(cfg).save_pretrained(d)
    return d


def test_a_speech_model_drives_training_and_new_audio(trained, tiny_hubert, tmp_path, monkeypatch):
    "audio_features='model': a local HuBERT's hidden states drive the fields; new audio goes through the same model."
    data, _ = trained
    before = {p.name for p in data.iterdir()}
    monkeypatch.chdir(tiny_hubert.parent)                          # the model named relative to the working folder
    cfg = cpu_demo_train_config(face_iters=20, mouth_iters=10, fused_iters=2, face_points=200, mouth_points=40,
                                audio_features="model", audio_model=tiny_hubert.name)
    run = tmp_path / "run"
    train(data, run, cfg, device="cpu", progress=False)
    assert {p.name for p in data.iterdir()} - before <= {"speech"} and len(list(data.glob("speech/*.pt"))) == 1
    head, _, _ = load_run(run, "cpu")                              # reopening checks the data checksum: unchanged
    assert head.cfg.audio_features == "model" and head.cfg.feat_dim == 16
    assert head.cfg.audio_model == str(tiny_hubert.resolve())     # resolved once: the run works from any folder
    meta = json.loads((data / "meta.json").read_text())
    feats, _ = audio_features(data / "audio.wav", meta, "model", str(tiny_hubert))
    store = FrameStore(data, "cpu", progress=False, audio="model", audio_model=str(tiny_hubert))
    assert feats.shape == tuple(store.audio.shape) == (meta["n_frames"], 16, 16)
    assert np.allclose(feats, store.audio.numpy(), atol=1e-4)     # new audio is windowed as the clip was
    r = render_video(run, tmp_path / "out.mp4", audio=data / "audio.wav", device="cpu", max_frames=5, progress=False)
    assert r["frames"] == 5


def test_a_speech_model_setting_is_checked_before_training(trained, tmp_path):
    data, _ = trained
    for changes, msg in ((dict(), "needs audio_model"), (dict(audio_model=str(tmp_path)), "holds no checkpoint")):
        with pytest.raises(ValueError, match=msg):
            train(data, tmp_path / "bad", cpu_demo_train_config(audio_features="model", **changes), device="cpu",
                  progress=False)
        assert not (tmp_path / "bad").exists()

"""Tests of the training chapter (30): resumable, crash-safe runs and model files on the committed synthetic head,
and the whole pipeline learning the synthetic head's known lip motion on a CPU.

Everything runs on the CPU at 64x64 (the synthetic clip preprocessed once per module, ~10 s)."""
import json, os, shutil, signal, subprocess, sys, textwrap, time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from talkinggs.samples import repo_root
from talkinggs.landmarks import INNER_LIP, OUTER_LIP, FOREHEAD, CHIN, RIGID
from talkinggs.clip import FrameStore
from talkinggs.model import load_head, head_state, head_from_store, head_geometry
from talkinggs.bookkeeping import read_metrics
from talkinggs.train import TrainConfig, cpu_demo_train_config, train
from talkinggs.lip_term import lip_landmark_targets, LIP_POINTS
from talkinggs.core import project_points

HEAD = repo_root() / "data_samples" / "synthetic_head"

pytestmark = pytest.mark.usefixtures("one_thread")   # fixture in conftest.py


@pytest.fixture(scope="module")
def clip(clip64_once, tmp_path_factory):
    "The committed synthetic talking head, preprocessed at 64x64 (a copy of the session's, conftest.py)."
    return Path(shutil.copytree(clip64_once, tmp_path_factory.mktemp("synthetic") / "clip64"))


def tiny_config(**changes) -> TrainConfig:
    "A few iterations of every stage: for the bookkeeping tests, not for quality."
    return cpu_demo_train_config(**{**dict(face_iters=40, mouth_iters=12, fused_iters=6, face_points=300,
                                           mouth_points=60, ckpt_every=8, log_every=2), **changes})


# ---------------------------------------------------------------- refusals

def test_refuses_folder_without_dataset(tmp_path):
    (tmp_path / "not_a_clip").mkdir()
    (tmp_path / "not_a_clip" / "video.mp4").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="preprocess"):
        train(tmp_path / "not_a_clip", tmp_path / "run", tiny_config(), device="cpu", progress=False)
    with pytest.raises(FileNotFoundError):
        train(tmp_path / "missing", tmp_path / "run", tiny_config(), device="cpu", progress=False)
    assert not (tmp_path / "run").exists()


def test_refuses_existing_run_without_resume(clip, tmp_path):
    run = tmp_path / "run"
    train(clip, run, tiny_config(face_iters=4, mouth_iters=2, fused_iters=1), device="cpu", progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    with pytest.raises(FileExistsError, match="resume"):
        train(clip, run, tiny_config(), device="cpu", progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before      # nothing touched


def test_resume_refuses_a_changed_setting_and_applies_a_safe_one(clip, tmp_path, capsys):
    "--resume continues with the run's own settings: what would change the result is refused by name, nothing touched."
    run, cfg = tmp_path / "run", tiny_config(face_iters=6, mouth_iters=3, fused_iters=2)
    train(clip, run, cfg, device="cpu", progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    with pytest.raises(ValueError, match="face_iters=6; --resume cannot change it to face_iters=8"):
        train(clip, run, tiny_config(face_iters=8, mouth_iters=3, fused_iters=2), device="cpu", resume=True,
              progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before      # nothing touched
    train(clip, run, tiny_config(face_iters=6, mouth_iters=3, fused_iters=2, log_every=3), device="cpu", resume=True,
          progress=False)
    assert "log_every: 2 -> 3" in capsys.readouterr().err                        # applied, and said
    assert json.loads((run / "config.json").read_text())["train"]["log_every"] == 3


def test_impossible_settings_are_refused_before_anything_is_written(clip, tmp_path):
    for bad, says in ((dict(face_iters=0), "face_iters must be at least 1"), (dict(sh_degree=9), "sh_degree"),
                      (dict(method="nerf"), "unknown method"), (dict(ckpt_every=0), "ckpt_every")):
        with pytest.raises(ValueError, match=says):
            train(clip, tmp_path / "run", tiny_config(**bad), device="cpu", progress=False)
        assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- model files

def test_head_state_round_trip_renders_equal(clip):
    store = FrameStore(clip, "cpu", progress=False)
    head = head_from_store(store, sh_degree=1, face_points=200, mouth_points=40, seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():                                   # non-zero motion (decoders start at zero) and colours
        for p in head.parameters(): p.add_(0.01 * torch.randn(p.shape, generator=g))
    back = load_head(head_state(head))
    assert back.cfg == head.cfg
    sd, sd2 = head.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    for t in (0, 40, store.n - 1):
        args = (store.viewmats[t], store.Ks[t], store.audio, t, store.expr[t])
        with torch.no_grad():
            a, b = (head.render(*args, background=store.frame(t)["torso_bg"]),
                    back.render(*args, background=store.frame(t)["torso_bg"]))
        assert (a["face"] - head.render(*args, motion=False)["face"]).abs().max() > 0   # the motion does something
        for k in ("image", "face", "mouth", "alpha"):
            assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- stage 0: pose corrections

def test_stage0_corrects_training_cameras_only_and_travels_with_the_model(clip, tmp_path):
    run = tmp_path / "run"
    head = train(clip, run, tiny_config(pose_refine=True, pose_iters=30, pose_start=0.0), device="cpu", progress=False)
    tracked = FrameStore(clip, "cpu", progress=False)
    tr, te = tracked.train_idx, tracked.test_idx
    moved = (head.viewmats - tracked.viewmats).abs().amax((1, 2))                   # [N]
    assert (moved[tr] > 0).all() and (moved[te] == 0).all()
    assert moved.max() < 0.05                                                        # small, rigid corrections
    R = head.viewmats[:, :3, :3]
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3).expand_as(R), atol=1e-5)  # still rotations
    box, mouth = head.mouth, head.mouth.splats                                      # inside-mouth Gaussians stayed
    assert ((mouth["means"] - torch.tensor(box.center)).abs() <= box.bound + 1e-6).all()   # in their box, no bigger
    assert (mouth["scales"] <= np.log(TrainConfig().mouth_scale_max * box.bound) + 1e-6).all()  # than the cap
    back = load_head(run / "model.pt")
    assert torch.equal(back.viewmats, head.viewmats)
    assert torch.equal(FrameStore(clip, "cpu", progress=False, cameras=back.viewmats).viewmats, head.viewmats)
    with pytest.raises(ValueError, match="not the clip"):
        FrameStore(clip, "cpu", progress=False, cameras=back.viewmats[:5])
    assert any(r["stage"] == "pose" for r in read_metrics(run / "metrics.csv"))
    from talkinggs.evaluate import evaluate
    rep = evaluate(run, progress=False, video=False)
    assert rep["cameras"].startswith("tracked, rigidly corrected") and (run / "eval" / "report.json").exists()
    rep = evaluate(run, progress=False, video=False, refine=False)
    assert rep["cameras"] == "tracked" and (run / "eval_tracked" / "report.json").exists()


def test_joint_camera_refinement_moves_training_cameras_and_they_reach_the_model(clip, tmp_path):
    "pose_joint: the face branch keeps correcting the training cameras; test cameras stay; model.pt holds the result."
    run = tmp_path / "run"
    head = train(clip, run, tiny_config(pose_refine=True, pose_iters=20, pose_start=0.0, pose_joint=True, pose_lr=2e-3),
                 device="cpu", progress=False)
    stage0 = load_head(run / "init.pt").viewmats                                    # cameras before the face branch
    moved = (head.viewmats - stage0).abs().amax((1, 2))                             # [N]
    store = FrameStore(clip, "cpu", progress=False)
    assert (moved[store.train_idx] > 0).all() and (moved[store.test_idx] == 0).all()
    face = torch.load(run / "face.ckpt.pt", map_location="cpu", weights_only=False)
    assert torch.equal(face["cams"], head.viewmats) and torch.equal(load_head(run / "model.pt").viewmats, head.viewmats)
    R = head.viewmats[:, :3, :3]
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3).expand_as(R), atol=1e-5)
    plain = train(clip, tmp_path / "plain", tiny_config(pose_refine=True, pose_iters=20, pose_start=0.0), device="cpu",
                  progress=False)
    assert torch.equal(plain.viewmats, load_head(tmp_path / "plain" / "init.pt").viewmats)   # off: stage 0's cameras


def test_pose_conditioned_head_trains_saves_and_renders(clip, tmp_path):
    "pose_cond: the face field sees the frame's pose (standardised with the clip's statistics saved in the model)."
    head = train(clip, tmp_path / "run", tiny_config(pose_cond=True), device="cpu", progress=False)
    back = load_head(tmp_path / "run" / "model.pt")
    assert back.cfg.pose_dim == 12 and torch.equal(back.face.motion.pose_std, head.face.motion.pose_std)
    assert (back.face.motion.pose_std != 1).any()                                   # set from the clip, not defaults
    from talkinggs.synthesize import Renderer
    store = FrameStore(clip, "cpu", progress=False)
    i = int(store.test_idx[0])
    with torch.no_grad():
        a = Renderer(back, backend="torch").frame(store.audio, i, store.viewmats[i], store.Ks[i], store.expr[i])
        b = back.render(store.viewmats[i], store.Ks[i], store.audio, i, store.expr[i], backend="torch")
    assert torch.allclose(a["image"], b["image"], atol=1e-5)                        # cached path = plain path


def test_random_background_makes_opaque_black_off_the_face_cost():
    """random_bg: an opaque black render where the face mask is off (the mouth) costs nothing over black, something
    over a colour."""
    from talkinggs.branch_stage import FaceRules
    torch.manual_seed(0)
    rgb, alpha = torch.zeros(1, 8, 8, 3), torch.ones(1, 8, 8, 1)                    # opaque black everywhere
    mask = torch.ones(1, 8, 8, dtype=torch.bool); mask[:, 3:5, 2:6] = False          # a "mouth" hole in the face mask
    target = torch.zeros(1, 8, 8, 3)                                                # black face, black outside
    base = dict(alpha_weight=0.0, ssim_lambda=0.0)
    black, _ = FaceRules().image_loss(rgb, alpha, target, mask, [], TrainConfig(face_bg="black", **base), [0])
    coloured, _ = FaceRules().image_loss(rgb, alpha, target, mask, [], TrainConfig(random_bg=True, **base), [0])
    assert black.item() == 0 and coloured.item() > 0.01


# ---------------------------------------------------------------- crash safety

KILLED_RUN = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from talkinggs.train import train, cpu_demo_train_config
    cfg = cpu_demo_train_config(**eval(sys.argv[3]))
    train(sys.argv[1], sys.argv[2], cfg, device="cpu", progress=False)
""")


def _checkpoint_files_load(run: Path):
    "Every model or checkpoint file of a run folder loads (no truncated file under a final name)."
    for p in run.glob("*.pt"):
        torch.load(p, map_location="cpu", weights_only=False)


def test_resume_after_sigkill(clip, tmp_path):
    run = tmp_path / "run"
    changes = dict(face_iters=60, mouth_iters=12, fused_iters=6, face_points=300, mouth_points=60, ckpt_every=5,
                   log_every=2)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(clip), str(run), repr(changes)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpt = run / "face.ckpt.pt"
    t0 = time.time()
    try:
        while not ckpt.exists():
            assert proc.poll() is None, (
                f"training exited before its first checkpoint:\n{proc.stdout.read().decode()[-2000:]}")
            assert time.time() - t0 < 120, "no checkpoint after 120 s"
            time.sleep(0.05)
        time.sleep(0.3)                                      # somewhere inside the face branch, maybe mid-save
    finally:
        proc.send_signal(signal.SIGKILL); proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "model.pt").exists()
    (run / f".face.ckpt.pt.tmp-{proc.pid}").write_bytes(b"half a checkpoint")   # as a kill during a save leaves it
    killed_at = torch.load(ckpt, map_location="cpu", weights_only=False)["step"]
    assert 0 < killed_at < 60
    _checkpoint_files_load(run)

    head = train(clip, run, None, device="cpu", resume=True, progress=False)      # None: the run's own settings
    assert not list(run.glob(".*.tmp-*"))                                       # the stale partial save is gone
    _checkpoint_files_load(run)
    for stage, iters in (("face", 60), ("mouth", 12), ("fused", 6)):
        assert torch.load(run / f"{stage}.ckpt.pt", map_location="cpu", weights_only=False)["step"] == iters
    back = load_head(run / "model.pt")
    assert (len(back.face.splats["means"]) == len(head.face.splats["means"])
            and torch.equal(back.face.splats["means"], head.face.splats["means"].cpu()))
    rows = read_metrics(run / "metrics.csv")
    keys = Counter((r["stage"], int(r["step"])) for r in rows)
    assert not [k for k, c in keys.items() if c > 1], "duplicated (stage, step) rows"
    for stage, iters in (("face", 60), ("mouth", 12), ("fused", 6)):
        steps = sorted(s for st, s in keys if st == stage)
        assert steps == sorted(set(range(0, iters, 2)) | {iters - 1}), (stage, steps)   # none lost either


# ---------------------------------------------------------------- the whole pipeline learns the known lip motion

LOWER_LIP = INNER_LIP[11:] + OUTER_LIP[11:]      # inner and outer lower-lip contours (mediapipe indices)


@torch.no_grad()
def lip_drop(head, store, sigma: float = 0.25) -> np.ndarray:
    """[n] learned lower-lip displacement relative to the rigid face, along the face's down axis, for every frame.

    Gaussians are weighted by opacity and by closeness to the triangulated lower-lip landmarks (minus the same
    weighting around rigid landmarks, so a whole-head shift counts as nothing); the signal is the weighted mean of
    their face-field offsets projected on the forehead-to-chin direction."""
    L = head_geometry(store)["landmarks3d"].astype(np.float64)                      # [478, 3] canonical frame
    down = L[CHIN] - L[FOREHEAD]; down /= np.linalg.norm(down)
    s = sigma * np.linalg.norm(L[61] - L[291])                                       # a quarter of the mouth width
    mu = head.face.splats["means"].double().numpy()                                         # [N, 3]
    op = torch.sigmoid(head.face.splats["opacities"]).double().numpy()                      # [N]
    def weights(ids):                                                                # [N], sums to 1
        d2 = ((mu[:, None] - L[ids][None]) ** 2).sum(-1).min(1)
        w = op * np.exp(-d2 / (2 * s * s)); return w / w.sum()
    w = weights(LOWER_LIP) - weights(RIGID)
    h = head.face.motion.encoder(head.face.splats["means"])
    return np.array([float(w @ (head.face.motion.decode(h, head.audio_code(head.face, store.audio, t),
                                                        store.expr[t])["d_means"]
                                .double().numpy() @ down)) for t in range(store.n)])


def test_lip_landmark_targets_carry_motion_only(clip):
    "The landmark term's targets: no mean pull on the canonical mouth, and their lip gap follows the true opening."
    store = FrameStore(clip, "cpu", progress=False)
    lips = lip_landmark_targets(store, head_geometry(store)["landmarks3d"])
    proj, _ = project_points(lips["points"], store.viewmats, store.Ks)            # [N, L+1, 2] canonical points
    resid = lips["targets"] - (proj[:, :-1] - proj[:, -1:])                       # [N, L, 2] what a zero field leaves
    assert resid[store.train_idx].mean(0).abs().max() < 1e-3                      # zero on average over training frames
    assert resid.abs().mean() > 0.1                                               # but not zero frame by frame
    truth = np.load(HEAD / "gt.npz")["opening"].astype(np.float64)                # [n] known opening
    gap = (lips["targets"][:, LIP_POINTS.index(14), 1] - lips["targets"][:, LIP_POINTS.index(13), 1]).numpy()
    n = min(len(gap), len(truth))
    assert np.corrcoef(gap[:n], truth[:n])[0, 1] > 0.6                             # inner lips part as the jaw opens


def test_pipeline_learns_the_known_lip_motion(clip, tmp_path):
    "Preprocessed video -> three-stage training on the CPU: the learned lower-lip drop follows the true jaw opening."
    t0 = time.time()
    store = FrameStore(clip, "cpu", progress=False)
    truth = np.load(HEAD / "gt.npz")["opening"].astype(np.float64)                   # [n] known opening in [0, 1]
    n = min(len(truth), store.n)
    rs = []
    for seed in (0, 1, 2):
        head = train(clip, tmp_path / f"run{seed}", cpu_demo_train_config(seed=seed), device="cpu", progress=False)
        rs.append(float(np.corrcoef(lip_drop(head, store)[:n], truth[:n])[0, 1]))
    print(f"learned vs true lip displacement, seeds 0-2: r = {np.round(rs, 3)} ({time.time() - t0:.0f} s)")
    # Three seeds, the middle one judged: one run is chaotic enough that its r moves with the CPU's floating-point
    # path (0.741 with torch's AVX2 kernels, 0.781 with AVX-512, same code and data) and, now and then, falls into a
    # fit whose lower lip rises as the jaw opens: chapter 14's shoulder rule moved 1.8 label pixels a frame on this
    # clip and seed 0 went from 0.87 to -0.32, while seeds 1 and 2 went 0.64 -> 0.76 and 0.80 -> 0.77.
    assert sorted(rs)[1] >= 0.6, rs
    with torch.no_grad(), np.errstate(invalid="ignore", divide="ignore"):            # the same measure can fail:
        untrained = head_from_store(store, sh_degree=1, face_points=1000, mouth_points=200)   # offsets all zero
        r0 = np.corrcoef(lip_drop(untrained, store)[:n], truth[:n])[0, 1]
    assert not r0 >= 0.6, r0


# ---------------------------------------------------------------- the layer behind the head (issue 26)

def test_a_moved_head_uncovers_no_background_between_jaw_and_neck(clip):
    """The torso layer fills the head with the nearest colours outside it: a head drawn higher than its mask leaves
    neck, not plate, between its jaw and the neck."""
    from talkinggs.masks import FACE, TORSO, nearest_outside
    store = FrameStore(clip, "cpu", progress=False)
    uncovered = 0
    for i in store.test_idx:
        fr, lab = store.frame(int(i)), store.labels[int(i)].numpy()                 # lab: [H, W] uint8
        head = fr["head"]                                                           # [H, W]
        moved = torch.roll(head, -2, dims=0)                                        # the head two rows higher
        h, cols = lab.shape[0], np.arange(lab.shape[1])
        top = h - np.argmax(head.numpy()[::-1], 0)                                  # [W] first row under the head
        jaw = (top < h) & (lab[np.minimum(top, h - 1), cols] == TORSO) & (lab[top - 1, cols] == FACE)   # [W]
        gap = head & ~moved & torch.from_numpy(jaw)[None]                           # newly visible, above the neck
        source = lab.reshape(-1)[nearest_outside(lab)]                              # [H, W] label each pixel shows
        assert (source[gap.numpy()] == TORSO).all(), f"frame {i}: background below the jaw"
        plate = store.plate.float() / 255
        old = torch.where(head[..., None], plate, fr["image"])                      # the plate under the head
        assert (old[gap] == plate[gap]).all()                                       # showed the plate right there
        uncovered += int(gap.sum())
    assert uncovered > 0                                                            # the check saw such pixels


def test_align_audio_moves_the_clips_own_audio_by_its_measured_lag(tmp_path, clip64_copy):
    "align_audio: the clip's windows are moved by meta.json's av_offset; the model records it, so evaluation agrees."
    import json, shutil
    from talkinggs.clip import FrameStore, clip_av_shift
    from talkinggs.model import model_store
    from talkinggs.synthesize import load_run
    src = clip64_copy()
    meta = json.loads((src / "meta.json").read_text())
    assert {"shift", "corr", "corr_at_zero", "found"} <= set(meta["av_offset"])   # preprocessing measured it
    meta["av_offset"]["shift"] = 2                                               # as if the sound lagged 2 frames
    (src / "meta.json").write_text(json.dumps(meta))
    assert clip_av_shift(src, meta) == 2
    cfg = cpu_demo_train_config(face_iters=10, mouth_iters=5, fused_iters=0, face_points=100, mouth_points=20,
                                align_audio=True)
    train(src, tmp_path / "run", cfg, device="cpu", progress=False)
    head, data, _ = load_run(tmp_path / "run", "cpu")
    assert head.cfg.audio_shift == 2
    plain = FrameStore(src, "cpu", progress=False)
    assert torch.equal(model_store(head, data).audio[:-2], plain.audio[2:])       # evaluation sees the moved audio

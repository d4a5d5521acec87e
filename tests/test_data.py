"""Tests of the data chapters (10-16): bad inputs, the CLI, and one real 8 s clip end to end.

Tests that need the shared real clip skip with a reason when it is absent; none of them downloads anything."""
import json, subprocess, sys, time, warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from talkinggs.samples import SAMPLES, find_sample, sha256sum, repo_root
from talkinggs.video import VideoError, ffmpeg_exe, probe_video
from talkinggs.preprocess import preprocess, PreprocessConfig
from talkinggs.clip import TalkingDataset
from talkinggs.features import align_length, load_openface_aus, AU_NAMES

KATIE = find_sample("hdtf_katie_8s.mp4")
needs_katie = pytest.mark.skipif(KATIE is None, reason="hdtf_katie_8s.mp4 not found (set TALKINGGS_DATA or put "
                                                       "../shared/data beside the checkout)")


def ffmpeg(*args):
    subprocess.run([ffmpeg_exe(), "-y", "-v", "error", *map(str, args)], check=True)


def noise_video(path, seconds=5.0, audio=True, fps=25, faststart=False):
    "A video of random noise (no face), optionally with a tone as audio."
    src = ["-f", "lavfi", "-i", f"nullsrc=s=256x256:r={fps}:d={seconds},geq=random(1)*255:128:128"]
    aud = ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=16000:duration={seconds}"] if audio else []
    extra = ["-movflags", "+faststart"] if faststart else []
    ffmpeg(*src, *aud, "-c:v", "libx264" if _has_x264() else "mpeg4", "-pix_fmt", "yuv420p",
           *(["-c:a", "aac"] if audio else []), *extra, path)
    return path


def _has_x264():
    r = subprocess.run([ffmpeg_exe(), "-hide_banner", "-encoders"], capture_output=True, text=True)
    return "libx264" in r.stdout


def assert_clean(out):
    "Nothing half-written: neither the output folder nor a temporary folder beside it."
    out = Path(out)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


# ---------------------------------------------------------------- samples

def test_manifest_file_matches_samples():
    on_disk = json.loads((repo_root() / "data_samples" / "manifest.json").read_text())
    assert on_disk == SAMPLES


@needs_katie
def test_shared_clip_checksum():
    assert sha256sum(KATIE) == SAMPLES["hdtf_katie_8s.mp4"]["sha256"]


# ---------------------------------------------------------------- bad inputs (item 1)

def test_unreadable(tmp_path):
    bad = tmp_path / "garbage.mp4"; bad.write_bytes(b"not a video" * 100)
    with pytest.raises(VideoError, match="unreadable video"):
        preprocess(bad, tmp_path / "out", progress=False)
    assert_clean(tmp_path / "out")


def test_truncated_index_missing(tmp_path):
    full = noise_video(tmp_path / "full.mp4", 6.0)
    cut = tmp_path / "cut.mp4"; cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(VideoError, match="unreadable video"):
        preprocess(cut, tmp_path / "out", progress=False)
    assert_clean(tmp_path / "out")


def test_truncated_data(tmp_path):
    full = noise_video(tmp_path / "full.mp4", 8.0, faststart=True)       # index first: the cut file still opens
    cut = tmp_path / "cut.mp4"; cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(VideoError, match="truncated or damaged"):
        preprocess(cut, tmp_path / "out", progress=False)
    assert_clean(tmp_path / "out")


def test_too_short(tmp_path):
    v = noise_video(tmp_path / "short.mp4", 3.0)
    with pytest.raises(VideoError, match=r"3\.0 s long; need at least 4 s"):
        preprocess(v, tmp_path / "out", progress=False)
    assert_clean(tmp_path / "out")


def test_no_face(tmp_path):
    v = noise_video(tmp_path / "noise.mp4", 5.0)
    with pytest.raises(VideoError, match=r"face found in 0\.0% of 125 frames.*no face in frames 0-124"):
        preprocess(v, tmp_path / "out", progress=False)
    assert_clean(tmp_path / "out")


def test_no_audio_and_audio_file(tmp_path):
    v = noise_video(tmp_path / "silent.mp4", 5.0, audio=False)
    with pytest.raises(VideoError, match="no audio track; pass one with --audio FILE"):
        preprocess(v, tmp_path / "out", progress=False)
    wav = tmp_path / "a.wav"; ffmpeg("-f", "lavfi", "-i", "sine=frequency=300:sample_rate=16000:duration=5", wav)
    with pytest.raises(VideoError, match="face found in"):          # with --audio the header check passes
        preprocess(v, tmp_path / "out", audio=wav, progress=False)
    assert_clean(tmp_path / "out")


def test_cli_one_line_error(tmp_path):
    script = tmp_path / "run.py"
    script.write_text("from talkinggs.cli import preprocess_cli\npreprocess_cli()\n")
    v = noise_video(tmp_path / "short.mp4", 3.0)
    r = subprocess.run([sys.executable, str(script), str(v), "--out", str(tmp_path / "out"), "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("talkinggs preprocess: error: short.mp4: clip is 3.0 s long")
    assert_clean(tmp_path / "out")


@needs_katie
def test_face_missing_in_some_frames(tmp_path):
    v = tmp_path / "covered.mp4"   # the face is covered by a black box during the first second (25 frames)
    ffmpeg("-i", KATIE, "-t", "5", "-vf", "drawbox=x=0:y=0:w=512:h=512:color=black:t=fill:enable='lt(t,1)'", v)
    with pytest.raises(VideoError, match=r"face found in 80\.0% of 125 frames \(need 95%\); no face in frames 0-24"):
        preprocess(v, tmp_path / "out", progress=False)
    assert_clean(tmp_path / "out")


@needs_katie
def test_face_too_small(tmp_path):
    v = tmp_path / "tiny.mp4"
    ffmpeg("-i", KATIE, "-t", "5", "-vf", "scale=128:128", v)
    with pytest.raises(VideoError, match=r"face is only \d+ px tall \(need 96 px\)"):
        preprocess(v, tmp_path / "out", progress=False)
    assert_clean(tmp_path / "out")


@needs_katie
def test_30fps_landscape_is_normalised(tmp_path):
    v = tmp_path / "wide30.mp4"
    ffmpeg("-i", KATIE, "-t", "5", "-vf", "fps=30,pad=768:512:128:0", v)
    info = probe_video(v)
    assert (info.width, info.height, info.fps) == (768, 512, 30.0)
    out = preprocess(v, tmp_path / "out", cfg=PreprocessConfig(size=256), progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n_frames"] == 125 and meta["width"] == meta["height"] == 256
    assert 100 <= meta["crop"]["x0"] <= 156                    # the square crop sits on the face, not the padding
    assert meta["reprojection_rms_px"] <= 2.0
    ds = TalkingDataset(out, "all")
    assert len(ds) == 125 and ds[0]["image"].shape == (256, 256, 3) and ds[0]["audio"].shape == (16, 80)


# ---------------------------------------------------------------- the real 8 s clip end to end

@needs_katie
def test_katie_end_to_end(tmp_path):
    t = time.perf_counter()
    out = preprocess(KATIE, tmp_path / "katie", progress=False)
    seconds = time.perf_counter() - t
    meta = json.loads((out / "meta.json").read_text())
    print(f"8 s clip preprocessed in {seconds:.1f} s; meta {meta['seconds']}")
    assert seconds <= 60   # acceptance is 20 s on 2 idle cores; CI machines are shared
    assert meta["n_frames"] == 200 and meta["split"] == {"train": [0, 181], "test": [181, 200]}
    assert meta["landmarks_found"] >= 0.99
    assert meta["reprojection_rms_px"] <= 2.0
    assert meta["mouth_area_vs_lip_gap_pearson"] >= 0.8
    act = np.load(out / "actions.npz")
    assert len(act["blinks"]) >= 1
    assert (act["ear"][act["blinks"]] < 0.75 * np.percentile(act["ear"], 95)).all()   # blinks sit on eye-closure peaks
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["katie"]
    cams = np.load(out / "cameras.npz")
    R = cams["viewmats"][:, :3, :3]
    assert np.allclose(R @ R.transpose(0, 2, 1), np.eye(3), atol=1e-4)
    assert (cams["viewmats"][:, 2, 3] > 0).all()              # the head is in front of every camera
    ds = TalkingDataset(out, "test")
    item = ds[0]
    assert item["index"] == 181 and item["image"].dtype.is_floating_point
    assert item["mouth"].sum() <= item["face"].sum() <= item["head"].sum()
    held = TalkingDataset(out, "test", frames_on_device=True)      # frames decoded once into a uint8 tensor
    assert held.frames.dtype == torch.uint8 and held.frames.shape == (19, 512, 512, 3)
    assert torch.equal(held[3]["image"], ds[3]["image"])
    with pytest.raises(FileExistsError, match="exists"):
        preprocess(KATIE, out, progress=False)


# ---------------------------------------------------------------- signals

def test_align_length_warns_with_frames():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        x = align_length(np.zeros(640 * 10 + 1280), 640 * 10, unit=640)
    assert len(x) == 6400 and "2.0 video frames longer" in str(w[-1].message)


def test_openface_import(tmp_path):
    p = tmp_path / "au.csv"
    rows = [" frame, timestamp, success, " + ", ".join(f" {a}_r" for a in AU_NAMES)]
    rows += [f"{i + 1}, {i / 25:.2f}, 1, " + ", ".join(f"{(i * (k + 1)) % 5}" for k in range(7)) for i in range(50)]
    p.write_text("\n".join(rows))
    e = load_openface_aus(p, 50)
    assert e.shape == (50, 7) and e.min() == 0 and e.max() == 1


# ---------------------------------------------------------------- the synthetic head (committed in data_samples)

def test_synthetic_head_pose_recovered():
    import torch
    from talkinggs.head_pose import fit_head_pose, project
    d = repo_root() / "data_samples" / "synthetic_head"
    assert sum(p.stat().st_size for p in d.iterdir()) <= 5e6
    gt = np.load(d / "gt.npz")
    T, size, f = len(gt["opening"]), 128, float(gt["Ks"][0, 0, 0])
    torch.manual_seed(0)
    kp = torch.tensor(gt["means"][gt["keypoint_idx"]])
    R, t = torch.tensor(gt["viewmats"][:, :3, :3]), torch.tensor(gt["viewmats"][:, :3, 3])
    uv = project(kp, R, t, torch.tensor(f), size / 2, size / 2) + 0.2 * torch.randn(T, len(kp), 2)
    xc = torch.einsum("nij,mj->nmi", R, kp) + t[:, None]
    zpx = (xc[..., 2] - xc[..., 2].mean(1, keepdim=True)) * f / t[:, 2:] * (1 + 0.1 * torch.randn(T, len(kp)))
    L = np.zeros((T, 478, 3), np.float32); idx = list(range(len(kp)))
    L[:, idx] = torch.cat([uv, zpx[..., None]], -1).numpy()
    fit = fit_head_pose(L, np.ones(T, bool), size, size, idx=idx, progress=False)
    Rf, tf = torch.tensor(fit["viewmats"][:, :3, :3]), torch.tensor(fit["viewmats"][:, :3, 3])
    rel = (R @ R[0].T).transpose(1, 2) @ (Rf @ Rf[0].T)
    ang = torch.rad2deg(torch.arccos(((rel.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1)))
    t_c = t + R @ kp.mean(0)                                   # the fit's origin is the keypoint centroid
    tdir = (torch.nn.functional.normalize(tf, dim=-1) - torch.nn.functional.normalize(t_c, dim=-1)).norm(dim=-1)
    assert ang.max() <= 1.0, ang.max()
    assert tdir.max() <= 0.02, tdir.max()
    assert abs(fit["focal"] / f - 1) <= 0.05, fit["focal"]


# ---------------------------------------------------------------- optional face-alignment backend (item 2)

from talkinggs.landmarks import (BackendUnavailable, FaceAlignment68, FaceMesh, face_alignment_available,
                                 face_alignment_missing, landmark_distance, to_68)

FA_MISSING = face_alignment_missing()


def test_face_alignment_unavailable_clear_error(tmp_path, monkeypatch):
    "An empty torch hub folder: a one-line error naming what is missing, and nothing is downloaded or created."
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    msg = face_alignment_missing()
    assert msg is not None and not face_alignment_available()
    with pytest.raises(BackendUnavailable) as e:
        FaceAlignment68("cpu")
    assert str(e.value) == msg and "\n" not in msg and "face-alignment" in msg
    try:
        import face_alignment  # noqa: F401
    except Exception:
        assert "pip install face-alignment" in msg
    else:
        assert "weights not found" in msg and str(hub / "checkpoints") in msg and "2DFAN4" in msg and "s3fd" in msg
    assert not hub.exists()


def _fake_face_alignment(monkeypatch):
    "Stand-in face_alignment modules carrying only the weight-URL tables that talkinggs reads."
    import types
    urls = {"face_alignment.api": {"2DFAN-4": "https://example.org/x/2DFAN4-abc.pth.tar"},
            "face_alignment.detection.sfd.sfd_detector": {"s3fd": "https://example.org/x/s3fd-def.pth"}}
    for name in ["face_alignment", "face_alignment.detection", "face_alignment.detection.sfd", *urls]:
        m = types.ModuleType(name)
        if name in urls: m.models_urls = urls[name]
        monkeypatch.setitem(sys.modules, name, m)


def test_face_alignment_weight_lookup(tmp_path, monkeypatch):
    "Weight files are looked up by the package's own URL names in torch hub's checkpoint folder."
    _fake_face_alignment(monkeypatch)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    ckpt = tmp_path / "checkpoints"
    msg = face_alignment_missing()
    assert "2DFAN4-abc.pth.tar" in msg and "s3fd-def.pth" in msg and str(ckpt) in msg
    assert "https://example.org/x/2DFAN4-abc.pth.tar" in msg
    ckpt.mkdir(); (ckpt / "s3fd-def.pth").write_bytes(b"0")
    msg = face_alignment_missing()
    assert "2DFAN4-abc.pth.tar" in msg and "s3fd-def.pth" not in msg
    (ckpt / "2DFAN4-abc.pth.tar").write_bytes(b"0")
    assert face_alignment_missing() is None and face_alignment_available()


@needs_katie
@pytest.mark.skipif(FA_MISSING is not None, reason=f"optional backend unavailable: {FA_MISSING}")
def test_face_alignment_on_katie_first_frame():
    "With the weights present: 68 finite points inside the frame, close to mediapipe's mapped 68 points."
    import imageio_ffmpeg
    gen = imageio_ffmpeg.read_frames(str(KATIE)); meta = next(gen)
    w, h = meta["size"]
    img = np.frombuffer(next(gen), np.uint8).reshape(h, w, 3)
    fa = FaceAlignment68("cpu")(img)                                   # [68, 2]
    assert fa.shape == (68, 2) and np.isfinite(fa).all()
    assert (fa >= 0).all() and (fa[:, 0] < w).all() and (fa[:, 1] < h).all()
    with FaceMesh(video_mode=False) as fm:
        mp68 = to_68(fm(img))[:, :2]                                   # [68, 2]
    assert fa[8, 1] > fa[27, 1] and fa[36, 0] < fa[45, 0]             # chin below the nose bridge; eyes in order
    assert landmark_distance(fa, mp68, normalize=True) < 0.15


def test_get_sample_downloads_once_and_checks_sha256(tmp_path, monkeypatch):
    "A sample not on this machine is fetched into the cache, checked by sha256; a bad download never lands there."
    import talkinggs.samples as D
    src = tmp_path / "remote.bin"; src.write_bytes(b"a sample clip" * 100)
    monkeypatch.setenv("TALKINGGS_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("TALKINGGS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(D.SAMPLES, "test_only_clip.bin", dict(url=src.as_uri(), sha256=D.sha256sum(src), facts="test"))
    got = D.get_sample("test_only_clip.bin")
    assert got == tmp_path / "cache" / "test_only_clip.bin" and got.read_bytes() == src.read_bytes()
    src.write_bytes(b"changed upstream")                      # found in the cache now: no second download
    assert D.get_sample("test_only_clip.bin").read_bytes() != b"changed upstream"
    monkeypatch.setitem(D.SAMPLES, "test_bad_clip.bin", dict(url=src.as_uri(), sha256="0" * 64, facts="test"))
    with pytest.raises(IOError, match="sha256"): D.get_sample("test_bad_clip.bin")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["test_only_clip.bin"]   # no partial file left
    with pytest.raises(FileNotFoundError, match="not in the manifest"): D.get_sample("no_such_clip.mp4")


def test_older_labels_upgraded_on_read(clip64_copy):
    "A folder written by the older label rule (a shoulder above the chin as head) reads as torso there, file untouched."
    import cv2
    from talkinggs.clip import FrameStore
    from talkinggs.masks import HAIR, TORSO, FACE
    root = clip64_copy()
    path = root / "masks" / "000000.png"
    lab = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)                         # [64, 64] uint8
    face = np.argwhere(lab >= FACE)
    assert len(face) and face[:, 1].min() > 8, "the synthetic face should leave the left edge free"
    lab[-8:, :4] = HAIR                                                        # the older rule's raised shoulder
    cv2.imwrite(str(path), lab)
    ds = TalkingDataset(root, split="all")
    assert (ds.labels(0)[-8:, :4] == TORSO).all()
    assert (FrameStore(root, progress=False).labels[0, -8:, :4] == TORSO).all()
    assert (cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[-8:, :4] == HAIR).all()   # nothing rewritten on disk

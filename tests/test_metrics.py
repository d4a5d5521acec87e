"""Tests of talkinggs.metrics (chapter 18) and of the video writer and ping-pong frame order (chapter 12): image
metrics, mouth landmarks and LMD, correlations, the atomic video writer, the optional LPIPS backend and the report
helpers. CPU only. Tests that need the shared real clip skip with a reason when it is absent; nothing is downloaded."""
import math, subprocess, sys, warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from talkinggs.samples import find_sample, repo_root
from talkinggs.landmarks import BackendUnavailable, INNER_LIP, OUTER_LIP
from talkinggs.video import ffmpeg_exe, iter_frames, probe_video
from talkinggs.core import to_uint8
from talkinggs.landmarks import MOUTH_IDX
from talkinggs.video import VideoWriter, write_video, mirrored_loop
from talkinggs.metrics import (psnr_masked, face_box, ssim_in_box, error_map, side_by_side,
                               mouth_landmarks, lmd, mouth_opening, pearson, correlation_interval, audio_energy,
                               smooth, lpips_missing, lpips_fn, summarize, metrics_table, _lpips_backbone_file)

pytestmark = pytest.mark.usefixtures("one_thread")   # one torch thread on shared CI cores (conftest.py)
KATIE = find_sample("hdtf_katie_8s.mp4")
needs_katie = pytest.mark.skipif(KATIE is None, reason="hdtf_katie_8s.mp4 not found (set TALKINGGS_DATA or put "
                                                       "../shared/data beside the checkout)")
SYNTH = repo_root() / "data_samples" / "synthetic_head" / "video.mp4"


def shifted(img, dx, dy):
    "Translate an [H, W, 3] image by (dx, dy) pixels, repeating edge pixels."
    h, w = img.shape[:2]
    return np.pad(img, ((dy, 0), (dx, 0), (0, 0)), mode="edge")[:h, :w]


# ---------------------------------------------------------------- image metrics

def test_psnr_masked_known_values():
    g = torch.full((16, 16, 3), 0.25)
    p = g.clone(); p[:, :8] += 0.1                 # left half off by 0.1
    left = torch.zeros(16, 16, dtype=torch.bool); left[:, :8] = True
    assert psnr_masked(p, g, left) == pytest.approx(20.0, abs=1e-4)
    assert psnr_masked(p, g) == pytest.approx(10 * math.log10(1 / 0.005), abs=1e-3)
    assert psnr_masked(p, g, ~left) == pytest.approx(100.0)
    assert psnr_masked(p.numpy(), g.numpy(), left.numpy()) == pytest.approx(20.0, abs=1e-4)


@pytest.mark.parametrize("mask, msg", [(torch.zeros(16, 16, dtype=torch.bool), "empty"),
                                       (torch.ones(8, 16, dtype=torch.bool), "does not match"),
                                       (torch.ones(16, 16, dtype=torch.uint8), "must be bool")])
def test_psnr_masked_bad_mask(mask, msg):
    with pytest.raises(ValueError, match=msg):
        psnr_masked(torch.rand(16, 16, 3), torch.rand(16, 16, 3), mask)


def test_psnr_masked_bad_images():
    with pytest.raises(ValueError, match="differ in shape"): psnr_masked(torch.rand(8, 8, 3), torch.rand(8, 9, 3))
    with pytest.raises(ValueError, match=r"\[0, 1\]"): psnr_masked(torch.rand(8, 8, 3) * 2, torch.rand(8, 8, 3))
    with pytest.raises(ValueError, match="channels last"): psnr_masked(torch.rand(3, 8, 8), torch.rand(3, 8, 8))


def test_face_box_margin_and_clipping():
    lms = np.zeros((478, 3), np.float32)
    lms[:, 0] = np.linspace(100, 200, 478); lms[:, 1] = np.linspace(50, 250, 478)
    assert face_box(lms, 512) == (90, 30, 210, 270)
    assert face_box(lms, 512, margin=0) == (100, 50, 200, 250)
    assert face_box(lms, (205, 260)) == (90, 30, 205, 260)        # clipped right and bottom
    assert face_box(lms - 120, 512) == (0, 0, 90, 150)            # clipped left and top
    assert all(isinstance(v, int) for v in face_box(lms, 512))
    lms[:10] = np.nan                                             # NaN rows are ignored
    assert face_box(lms, 512, margin=0)[2:] == (200, 250)
    with pytest.raises(ValueError, match="outside"): face_box(lms + 1000, 512)
    with pytest.raises(ValueError, match="all NaN"): face_box(np.full((478, 2), np.nan), 512)
    with pytest.raises(ValueError, match=r"\[P, >=2\]"): face_box(np.zeros(478), 512)


def test_ssim_in_box():
    ramp = torch.linspace(0, 1, 48)[None, :, None].expand(48, 48, 3).contiguous()
    assert ssim_in_box(ramp, ramp, (4, 4, 40, 40)) == pytest.approx(1.0, abs=1e-5)
    other = ramp.clone(); other[30:] = 0.5                        # differs only below row 30
    assert ssim_in_box(other, ramp, (0, 0, 48, 20)) == pytest.approx(1.0, abs=1e-5)
    assert ssim_in_box(other, ramp, (0, 28, 48, 48)) < 0.9
    with pytest.raises(ValueError, match="not inside"): ssim_in_box(ramp, ramp, (0, 0, 60, 40))
    with pytest.raises(ValueError, match="SSIM window"): ssim_in_box(ramp, ramp, (0, 0, 10, 40))


def test_to_uint8_rounds_and_accepts_both_kinds():
    t = torch.tensor([0.0, 0.4 / 255, 0.6 / 255, 1.0])[:, None, None].expand(4, 1, 3)
    assert to_uint8(t)[:, 0, 0].tolist() == [0, 0, 1, 255]       # rounds, does not truncate
    u = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    assert to_uint8(u) is u
    np.testing.assert_array_equal(to_uint8(torch.from_numpy(u).float() / 255), u)
    with pytest.raises(ValueError): to_uint8(np.zeros((5, 6), np.uint8))


def test_error_map_and_side_by_side_shapes():
    a = torch.rand(20, 30, 3)
    em = error_map(a, a)
    assert em.shape == (20, 30, 3) and em.dtype == np.uint8
    assert (em == em[0, 0]).all()                                # zero error: one colour
    b = a.clone(); b[:5] = (b[:5] + 0.5) % 1.0
    em2 = error_map(b, a)
    assert em2[:5].astype(int).sum() > em2[10:].astype(int).sum()  # brighter where the error is
    sbs = side_by_side(to_uint8(a), b)
    assert sbs.shape == (20, 90, 3) and sbs.dtype == np.uint8
    np.testing.assert_array_equal(sbs[:, :30], to_uint8(a))
    with pytest.raises(ValueError, match="vmax"): error_map(a, a, vmax=0)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"): error_map(a, a[:10])


# ---------------------------------------------------------------- landmarks, LMD, mouth opening

def test_mouth_idx():
    assert MOUTH_IDX == sorted(set(INNER_LIP) | set(OUTER_LIP)) and len(MOUTH_IDX) == 40


def test_lmd_of_shifted_landmarks_is_shift_times_scale():
    rng = np.random.default_rng(0)
    gt = rng.uniform(100, 300, (7, len(MOUTH_IDX), 2))
    pred = gt + np.array([3.0, 4.0])                            # every point 5 px away
    assert lmd(gt, gt) == 0.0
    assert lmd(pred, gt) == pytest.approx(5.0)
    assert lmd(pred, gt, scale=512 / 256) == pytest.approx(10.0)
    pred[2, 5] = np.nan; gt[4] = np.nan                          # frames with NaN in either are ignored
    pred[0] += 100; gt[0] += 100
    assert lmd(pred, gt) == pytest.approx(5.0)
    with pytest.warns(UserWarning, match="no frame"):
        assert math.isnan(lmd(np.full((2, 40, 2), np.nan), gt[:2]))
    with pytest.raises(ValueError, match="same shape"): lmd(pred, gt[:3])


def test_mouth_opening_layouts():
    lms = np.zeros((3, 478, 2), np.float32)
    lms[:, [13, 81, 311], 1] = 100.0
    lms[:, [14, 178, 402], 1] = 100.0 + np.array([2.0, 4.0, 6.0])[:, None]   # gap 2, 4, 6 px per frame
    np.testing.assert_allclose(mouth_opening(lms), [2, 4, 6])
    np.testing.assert_allclose(mouth_opening(lms[:, MOUTH_IDX]), [2, 4, 6])   # the MOUTH_IDX subset
    np.testing.assert_allclose(mouth_opening(lms[0]), 2)                        # one frame
    with pytest.raises(ValueError, match="MOUTH_IDX"): mouth_opening(lms[:, :68])


def test_mouth_landmarks_synthetic_head():
    frames = np.stack([f for f, _ in zip(iter_frames(SYNTH), range(4))])       # [4, 128, 128, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = mouth_landmarks(frames, video_mode=False)
    assert lm.shape == (4, len(MOUTH_IDX), 2) and lm.dtype == np.float32
    assert not np.isnan(lm).any()                                 # the face was found in every frame
    # inside the frame, in its lower half (the mouth)
    assert ((lm >= 0) & (lm < 128)).all() and (lm[..., 1].mean() > 64)
    with pytest.warns(UserWarning, match="no face found in 1 of 1 frames"):
        blank = mouth_landmarks(np.zeros((1, 64, 64, 3), np.uint8))
    assert np.isnan(blank).all()
    with pytest.raises(ValueError, match="uint8"): mouth_landmarks(np.zeros((1, 64, 64, 3), np.float32))


@needs_katie
def test_lmd_real_frames_shifted():
    frames = np.stack([f for f, _ in zip(iter_frames(KATIE), range(30))])[::6]  # 5 frames, 512²
    gt = mouth_landmarks(frames, video_mode=False)
    pred = mouth_landmarks(np.stack([shifted(f, 4, 3) for f in frames]), video_mode=False)
    assert not np.isnan(gt).any() and not np.isnan(pred).any()
    assert lmd(gt, gt) == 0.0
    assert lmd(pred, gt) == pytest.approx(5.0, abs=1.5)          # detector jitter is about a pixel
    assert abs(mouth_opening(pred).mean() - mouth_opening(gt).mean()) < 1.5


# ---------------------------------------------------------------- correlations and audio

def test_correlation_interval_is_fishers_z_and_narrows_with_frames():
    rng = np.random.default_rng(1)
    a = rng.normal(size=15)
    b = a + 2 * rng.normal(size=15)
    r, half = pearson(a, b), 1.959964 / math.sqrt(15 - 3)          # tanh(atanh(r) ± z / √(N − 3))
    lo, hi = correlation_interval(a, b)
    assert lo < r < hi
    assert abs(lo - math.tanh(math.atanh(r) - half)) < 1e-5 and abs(hi - math.tanh(math.atanh(r) + half)) < 1e-5
    lo4, hi4 = correlation_interval(np.tile(a, 4), np.tile(b, 4))    # same r, four times the frames: narrower
    assert hi4 - lo4 < (hi - lo) / 1.8
    assert all(math.isnan(v) for v in correlation_interval([1, 2, 3], [3, 1, 2]))        # 3 pairs: no interval
    assert all(math.isnan(v) for v in correlation_interval([2, 2, 2, 2], [1, 2, 3, 4]))  # a constant signal
    with pytest.raises(ValueError, match="length"):
        correlation_interval([1, 2, 3, 4], [1, 2, 3])


def test_pearson():
    assert pearson([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert pearson(np.arange(10), -np.arange(10)) == pytest.approx(-1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                           # no RuntimeWarning either
        assert math.isnan(pearson([2, 2, 2], [1, 2, 3]))
        assert math.isnan(pearson([], []))
        assert math.isnan(pearson([1, np.nan], [1, 2]))
    assert pearson([1, 2, np.nan, 4, 5], [1, 2, 3, 4, 5]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="length"): pearson([1, 2], [1, 2, 3])


def test_audio_energy_and_smooth(tmp_path):
    sr, fps = 16000, 25
    x = np.zeros(sr, np.float32); x[640:1280] = 0.5; x[1280:1920] = -0.25    # frame 1: 0.5, frame 2: 0.25
    e = audio_energy(x, sr, fps, 30)
    assert e.shape == (30,)
    np.testing.assert_allclose(e[:4], [0, 0.5, 0.25, 0], atol=1e-6)
    assert (e[25:] == 0).all()                                   # past the end of 1 s of audio
    np.testing.assert_allclose(audio_energy(np.stack([x, x], 1), sr, fps, 4), e[:4], atol=1e-6)  # stereo
    e30 = audio_energy(x, 44100, 30, 5)                          # non-integer samples per frame
    assert e30.shape == (5,)
    soundfile.write(tmp_path / "a.wav", x, sr)
    np.testing.assert_allclose(audio_energy(tmp_path / "a.wav", sr, fps, 4), e[:4], atol=1e-3)
    np.testing.assert_allclose(smooth(np.array([0, 0, 5, 0, 0.0]), 5), [1, 1, 1, 1, 1])
    np.testing.assert_allclose(smooth(np.arange(4.0), 1), np.arange(4.0))
    with pytest.raises(ValueError, match="odd"): smooth(np.zeros(4), 4)


# ---------------------------------------------------------------- video writer

def _wav(path, seconds=0.4, sr=16000):
    t = np.arange(int(seconds * sr)) / sr
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr)
    return path


def _frames(n=10, h=48, w=64):
    rng = np.random.default_rng(1)
    return [np.full((h, w, 3), rng.integers(0, 256, 3), np.uint8) for _ in range(n)]


def test_video_writer_round_trip_with_audio(tmp_path):
    import imageio_ffmpeg
    out = tmp_path / "clip.mp4"
    with VideoWriter(out, fps=25, audio=_wav(tmp_path / "tone.wav")) as vw:
        for f in _frames(): vw.write(f)
        assert not out.exists()                                  # only appears on a clean exit
    assert vw.n_frames == 10 and vw.size == (64, 48)
    info = probe_video(out)
    assert (info.width, info.height) == (64, 48) and info.codec == "h264" and info.audio_codec == "aac"
    gen = imageio_ffmpeg.read_frames(str(out))
    meta = next(gen)
    got = [np.frombuffer(b, np.uint8).reshape(48, 64, 3) for b in gen]
    assert meta["size"] == (64, 48) and len(got) == 10
    assert np.abs(got[3].astype(int) - _frames()[3].astype(int)).mean() < 4   # flat colours survive H.264
    r = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(out)], capture_output=True, text=True)
    assert "Audio: aac" in r.stderr and "Video: h264" in r.stderr and "yuv420p" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "tone.wav"]   # no temporary left


def test_write_video_torch_frames_no_audio(tmp_path):
    frames = torch.rand(6, 32, 32, 3)
    out = write_video(frames, tmp_path / "t.mp4", fps=10)
    info = probe_video(out)
    assert (info.width, info.height) == (32, 32) and info.audio_codec is None
    assert info.duration == pytest.approx(0.6, abs=0.05)


@pytest.mark.parametrize("exc", [KeyError, KeyboardInterrupt])
def test_video_writer_leaves_nothing_on_exception(tmp_path, exc):
    out = tmp_path / "broken.mp4"
    with pytest.raises(exc):
        with VideoWriter(out, audio=_wav(tmp_path / "tone.wav")) as vw:
            for f in _frames(5): vw.write(f)
            raise exc("stop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tone.wav"]


def test_video_writer_keeps_old_file_on_failure(tmp_path):
    out = write_video(_frames(3), tmp_path / "v.mp4")
    before = out.read_bytes()
    with pytest.raises(ValueError, match="earlier frames"):
        with VideoWriter(out) as vw:
            vw.write(_frames(1)[0]); vw.write(np.zeros((48, 32, 3), np.uint8))
    assert out.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_video_writer_errors_and_padding(tmp_path):
    with pytest.raises(ValueError, match="odd"): write_video([np.zeros((47, 64, 3), np.uint8)], tmp_path / "o.mp4")
    assert list(tmp_path.iterdir()) == []
    out = write_video([np.zeros((47, 63, 3), np.uint8)] * 3, tmp_path / "p.mp4", pad=True)
    assert (probe_video(out).width, probe_video(out).height) == (64, 48)
    with pytest.raises(ValueError, match="no frames"):
        with VideoWriter(tmp_path / "empty.mp4"): pass
    assert not (tmp_path / "empty.mp4").exists()
    with pytest.raises(FileNotFoundError, match="audio"): VideoWriter(tmp_path / "a.mp4", audio=tmp_path / "none.wav")
    with pytest.raises(FileNotFoundError, match="folder"): VideoWriter(tmp_path / "nope" / "a.mp4")
    with pytest.raises(RuntimeError, match="with"): VideoWriter(tmp_path / "a.mp4").write(np.zeros((8, 8, 3), np.uint8))


def test_video_writer_without_imageio_ffmpeg(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)     # makes `import imageio_ffmpeg` fail
    with pytest.raises(RuntimeError, match="pip install imageio-ffmpeg"):
        VideoWriter(tmp_path / "x.mp4")


# ---------------------------------------------------------------- mirrored loop

@pytest.mark.parametrize("n_src, n_out", [(2, 9), (5, 40), (17, 100), (200, 1000)])
def test_mirrored_loop_properties(n_src, n_out):
    idx = mirrored_loop(n_src, n_out)
    assert idx.shape == (n_out,) and idx.dtype == np.int64
    assert idx[0] == 0 and idx.min() >= 0 and idx.max() <= n_src - 1
    assert (np.abs(np.diff(idx)) == 1).all()                    # every step to a neighbour: no jump, no repeat
    np.testing.assert_array_equal(idx[:n_src], np.arange(min(n_src, n_out)))
    period = 2 * (n_src - 1)
    np.testing.assert_array_equal(idx[period:], idx[:n_out - period])


def test_mirrored_loop_edges():
    assert mirrored_loop(4, 10).tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert mirrored_loop(1, 4).tolist() == [0, 0, 0, 0]
    assert mirrored_loop(3, 0).tolist() == []
    with pytest.raises(ValueError, match="at least 1"): mirrored_loop(0, 3)
    with pytest.raises(ValueError, match="n_out"): mirrored_loop(3, -1)


# ---------------------------------------------------------------- LPIPS (optional backend)

def test_lpips_unavailable_here_raises_backend_unavailable():
    why = lpips_missing()
    if why is None: pytest.skip("lpips and its weights are present here: the unavailable path cannot be tested")
    with pytest.raises(BackendUnavailable) as e:
        lpips_fn()
    msg = str(e.value)
    assert "\n" not in msg and ("pip install lpips" in msg or "never downloads" in msg)


def test_lpips_missing_backbone_weights(tmp_path, monkeypatch):
    "A package that imports but no backbone file in torch hub's checkpoints: a one-line reason naming the file."
    pkg = tmp_path / "site" / "lpips"
    (pkg / "weights" / "v0.1").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "weights" / "v0.1" / "alex.pth").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "lpips", raising=False)
    hub = tmp_path / "hub"
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    try:
        why = lpips_missing("alex")
        assert why is not None and "\n" not in why and "alexnet-" in why and str(hub / "checkpoints") in why
        with pytest.raises(BackendUnavailable, match="never downloads"): lpips_fn(net="alex")
        assert "vgg.pth" in lpips_missing("vgg")                 # its linear weights are absent too
        (hub / "checkpoints").mkdir(parents=True)
        _lpips_backbone_file("alex").write_bytes(b"")
        assert lpips_missing("alex") is None                      # all present: the real backend would load
    finally:
        torch.hub.set_dir(old)
        sys.modules.pop("lpips", None)
    with pytest.raises(ValueError, match="unknown LPIPS net"): lpips_missing("resnet")


# ---------------------------------------------------------------- reports

def test_summarize_and_table():
    rows = [dict(name="a", psnr=30, ssim=np.float32(0.9), lpips=None, lmd=float("nan"), ok=True),
            dict(name="b", psnr=32.0, ssim=torch.tensor(0.8), lpips=None, lmd=4.0, ok=False),
            dict(psnr=None, lmd=2.0)]
    rep = summarize(rows)
    assert (rep["psnr"] == pytest.approx(31.0) and rep["ssim"] == pytest.approx(0.85)
            and rep["lmd"] == pytest.approx(3.0))
    assert math.isnan(rep["lpips"]) and "name" not in rep and "ok" not in rep
    assert summarize([]) == {}
    t = metrics_table(rep, digits=2)
    assert t.splitlines()[0] == "| metric | value |" and "| psnr | 31.00 |" in t and "| lpips | – |" in t
    t2 = metrics_table({"ours": rep, "other": dict(psnr=29.0, extra=1)})
    lines = t2.splitlines()
    assert lines[0] == "| run | psnr | ssim | lpips | lmd | extra |" and len(lines) == 4
    assert lines[3].startswith("| other | 29.000 | – |") and lines[3].endswith("| 1 |")

"""Tests of the toy, traces and widgets chapters (40_toy, 41_traces, 42_widgets, 43_train_widgets): the synthetic
clip and its fitted fields, their traces, and the widgets built from them on CPU, whose callbacks change what the
plotly FigureWidgets hold. No browser here (tests/test_viz_browser.py drives a real one)."""
import math
import numpy as np
import pytest
import torch
from plotly.callbacks import Points

from talkinggs.toy import (SyntheticClipConfig, synthetic_talking_clip, band_energies, fit_clip_models, cpu_grid,
                           ConcatCondition, train_photometric)
from talkinggs.traces import compute_traces, offset_correlation, attention_of, DeformationTraces, _uint8
from talkinggs.widgets import parse_indices, TraceExplorer, AttentionView
from talkinggs.train_widgets import SamplingView, RetrainConfig, RetrainPanel
from talkinggs.motion_field import MotionField, face_branch_config
from talkinggs.sampling import IncrementalSampler, WindowRule
from talkinggs.fusion import render_face_mouth

TINY = SyntheticClipConfig(n_frames=12, size=32, n_face=500, n_mouth=60, n_eyelid=12, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")   # fixture in conftest.py


@pytest.fixture(scope="module")
def clip(one_thread):
    return synthetic_talking_clip(TINY)


@pytest.fixture(scope="module")
def models(clip):
    return fit_clip_models(clip, steps=80, app_steps=15)


@pytest.fixture(scope="module")
def traces(clip, models):
    return compute_traces(clip, **models)


# ---------------------------------------------------------------- the synthetic clip
def test_clip_is_consistent(clip):
    T, S = TINY.n_frames, TINY.size
    nf, nm = len(clip.face["means"]), len(clip.mouth["means"])
    assert clip.frames.shape == (T, S, S, 3) and clip.frames.min() >= 0 and clip.frames.max() <= 1
    assert clip.d_face.shape == (T, nf, 3) and clip.d_mouth.shape == (T, nm, 3) and clip.branch.shape == (nf + nm,)
    assert len(clip.waveform) == round(T / TINY.fps * TINY.sample_rate)
    assert all(m.shape == (nf + nm,) and m.any() for m in clip.regions.values())
    assert not (clip.regions["lips"] & clip.regions["jaw"]).any() and not clip.regions["teeth"][:nf].any()
    # only x = z = 0 offsets, eyelids move with the blink only, the mouth moves with the opening only
    assert clip.d_face[..., [0, 2]].abs().max() == 0
    lids = clip.regions["eyelids"][:nf]
    assert torch.allclose(clip.d_face[:, lids, 1], -TINY.lid_drop * clip.blink[:, None].expand(-1, int(lids.sum())))
    still = clip.opening < 1e-3
    if still.any(): assert clip.d_mouth[still].abs().max() < 1e-3 * TINY.jaw_drop
    # frames differ where the mouth opening differs
    a, b = int(clip.opening.argmin()), int(clip.opening.argmax())
    assert (clip.frames[a] - clip.frames[b]).abs().max() > 0.2


def test_band_energies_split_frequencies():
    sr, T = 16_000, 5
    t = torch.arange(sr * T // 25) / sr
    low = band_energies(torch.sin(2 * math.pi * 200 * t), T, sr, split_hz=500)     # [T, 2]
    high = band_energies(torch.sin(2 * math.pi * 2000 * t), T, sr, split_hz=500)
    assert low.shape == (T, 2) and torch.allclose(low.amax(0), torch.ones(2))
    # each band is scaled to max 1 on its own, so compare raw ratios through a two-tone signal instead
    both = band_energies(torch.sin(2 * math.pi * 200 * t) * (t < t[-1] / 2)
                         + torch.sin(2 * math.pi * 2000 * t) * (t >= t[-1] / 2), T, sr)
    assert both[0, 0] > 0.9 and both[0, 1] < 0.1 and both[-1, 1] > 0.9 and both[-1, 0] < 0.1


def test_parse_indices():
    assert parse_indices("3, 10-12,, 3", 20).tolist() == [3, 10, 11, 12]
    assert parse_indices("", 5).tolist() == []
    with pytest.raises(ValueError, match=r"\[0, 19\]"): parse_indices("25", 20)
    with pytest.raises(ValueError): parse_indices("a-b", 20)


def test_concat_condition_splits_audio_and_expr():
    torch.manual_seed(0)
    f = MotionField(face_branch_config(grid=cpu_grid(), audio_dim=2, expr_dim=1))
    with torch.no_grad(): f.decoder[-1].weight.normal_(0, 0.1)
    means, a, e = torch.rand(20, 3) - 0.5, torch.rand(2), torch.rand(1)
    got, want = ConcatCondition(f)(means, torch.cat([a, e]))["d_means"], f(means, a, e)["d_means"]
    assert torch.allclose(got, want) and got.abs().sum() > 0
    assert ConcatCondition(f).param_groups(1e-2, 1e-3)[0]["lr"] == 1e-2


# ---------------------------------------------------------------- traces
def test_traces_follow_the_fitted_fields(clip, models, traces):
    T, N = TINY.n_frames, len(clip.branch)
    assert traces.d_means.shape == (T, N, 3) and traces.colors.shape == (T, N, 4)
    assert traces.renders.shape == traces.frames.shape == traces.app_renders.shape == (T, TINY.size, TINY.size, 3)
    t = 5
    with torch.no_grad():
        want = models["face_field"](clip.face["means"], clip.audio[t], clip.expr[t])["d_means"].numpy()
    nf = len(clip.face["means"])
    assert np.allclose(traces.d_means[t, :nf], want, atol=1e-6)
    assert np.isnan(traces.colors[:, nf:]).all() and np.isfinite(traces.colors[:, :nf]).all()
    # the fitted lips follow the opening; a trace of the true offsets correlates perfectly
    assert offset_correlation(traces, "lips", clip.opening.numpy()) > 0.8
    true = DeformationTraces(**{**traces.__dict__, "d_means": torch.cat([clip.d_face, clip.d_mouth], 1).numpy()})
    assert offset_correlation(true, "lips", clip.opening.numpy()) > 0.999


def test_traces_keep_mask_and_new_audio(clip, models, traces):
    keep = clip.regions["teeth"]
    sub = compute_traces(clip, models["face_field"], models["mouth_field"], keep=keep)
    assert sub.colors is None and sub.app_renders is None
    assert np.array_equal(sub.d_means, traces.d_means[:, keep.numpy()]) and sub.regions["teeth"].all()
    assert np.array_equal(sub.index, keep.nonzero()[:, 0].numpy())
    new = compute_traces(clip, models["face_field"], audio=clip.audio[:5], expr=clip.expr[:5])
    assert new.frames is None and new.signal is None and new.d_means.shape[0] == 5
    assert np.all(new.d_means[:, clip.branch.numpy() == 1] == 0)                 # no mouth field: static mouth
    with pytest.raises(ValueError, match="expr has"): compute_traces(clip, models["face_field"], audio=clip.audio[:5])


# ---------------------------------------------------------------- trace explorer
def test_explorer_slider_moves_frames_and_cursors(traces):
    ex = TraceExplorer(traces)
    assert (len(ex.frames_fig.data) == 3
            and np.array_equal(np.asarray(ex.frames_fig.data[0].z), _uint8(traces.renders[0])))
    ex.slider.value = 7                                        # what dragging the slider does
    for i, arr in enumerate((traces.renders, traces.app_renders, traces.frames)):
        assert np.array_equal(np.asarray(ex.frames_fig.data[i].z), _uint8(arr[7]))
    for i in ex._cursor: assert list(ex.trace_fig.data[i].x) == [7, 7]
    ex.set_frame(2)
    assert ex.slider.value == 2 and list(ex.trace_fig.data[ex._cursor[1]].x) == [2, 2]
    # the cursor spans the data of its row
    y = np.asarray(ex.trace_fig.data[1].y)
    lo, hi = ex.trace_fig.data[ex._cursor[0]].y
    assert lo <= np.nanmin(y) + 1e-9 and hi >= np.nanmax(y) - 1e-9


def test_explorer_selection_callbacks(traces):
    ex = TraceExplorer(traces, region="jaw")
    jaw = traces.regions["jaw"]
    assert np.allclose(np.asarray(ex.trace_fig.data[1].y), traces.d_means[:, jaw, 1].mean(1), atol=1e-7)
    assert len(ex.points_fig.data[1].x) == jaw.sum()
    ex.region.value = "eyelids"
    lids = traces.regions["eyelids"]
    assert np.allclose(np.asarray(ex.trace_fig.data[1].y), traces.d_means[:, lids, 1].mean(1), atol=1e-7)
    assert np.allclose(np.asarray(ex.trace_fig.data[4].y), traces.colors[:, lids, 1].mean(1), atol=1e-7)
    ex.indices.value = "4, 6-7"                                # typed into the index box
    assert ex.region.value == "(picked)" and ex.selection.tolist() == [4, 6, 7]
    assert np.allclose(np.asarray(ex.trace_fig.data[2].y), traces.d_means[:, [4, 6, 7], 2].mean(1), atol=1e-7)
    ex.indices.value = "999999"                                # out of range: message, selection kept
    assert "must lie in" in ex.info.value and ex.selection.tolist() == [4, 6, 7]
    ex._on_click(ex.points_fig.data[0], Points([11], [0]), None)   # a click on point 11
    assert ex.selection.tolist() == [11] and list(ex.points_fig.data[1].x) == [traces.means[11, 0]]
    ex.region.value = "teeth"                                  # mouth Gaussians: no colour trace
    assert np.isnan(np.asarray(ex.trace_fig.data[3].y, dtype=float)).all() and "no colour trace" in ex.info.value
    ex.color_by.value = "branch"
    assert np.array_equal(np.asarray(ex.points_fig.data[0].marker.color), traces.branch)
    ex.color_by.value = "colour change"
    c = np.asarray(ex.points_fig.data[0].marker.color)
    assert c[traces.branch == 1].max() == 0 and c[traces.branch == 0].max() > 0
    ex.color_by.value = "motion"
    assert np.allclose(np.asarray(ex.points_fig.data[0].marker.color), np.linalg.norm(traces.d_means, axis=-1).max(0))


def test_explorer_without_appearance_or_ground_truth(clip, models):
    tr = compute_traces(clip, models["face_field"], models["mouth_field"], audio=clip.audio.flip(0), expr=clip.expr)
    ex = TraceExplorer(tr)
    assert [n for n, _ in ex._panels] == ["deformation"] and len(ex.frames_fig.data) == 1
    assert np.isnan(np.asarray(ex.trace_fig.data[3].y, dtype=float)).all() and ex.colour_change.max() == 0
    ex.slider.value = 4
    assert np.array_equal(np.asarray(ex.frames_fig.data[0].z), _uint8(tr.renders[4]))
    fig = ex.static()
    assert len(fig.axes) >= 4


def test_explorer_sends_no_float16_to_the_browser(traces):
    "Saved traces may hold float16 offsets (save space); plotly's widget cannot deserialise them in the browser."
    import dataclasses
    half = dataclasses.replace(traces, d_means=traces.d_means.astype(np.float16))
    ex = TraceExplorer(half)
    ex.slider.value = 3
    for fig in (ex.points_fig, ex.trace_fig):
        for tr in fig.data:
            for key in ("x", "y", "z"):
                v = getattr(tr, key, None)
                if isinstance(v, np.ndarray): assert v.dtype != np.float16, (tr.name, key)
        colour = fig.data[0].marker.color if fig is ex.points_fig else None
        if isinstance(colour, np.ndarray): assert colour.dtype != np.float16
    assert np.allclose(np.asarray(ex.trace_fig.data[1].y), half.d_means[:, ex.selection, 1].astype(np.float32).mean(1))


# ---------------------------------------------------------------- region attention
def test_attention_view_toggles_branches(clip, models):
    view = AttentionView({"face": (clip.face["means"], models["face_field"]),
                          "mouth": (clip.mouth["means"], models["mouth_field"])})
    att = attention_of(models["face_field"], clip.face["means"])
    assert att["audio"].shape == att["expr"].shape == (len(clip.face["means"]),)
    assert (np.allclose(np.asarray(view.fig.data[0].marker.color), att["audio"])
            and np.allclose(np.asarray(view.fig.data[1].marker.color), att["expr"]))
    assert attention_of(models["mouth_field"], clip.mouth["means"]) == {"audio": None, "expr": None}
    view.branch.value = "mouth"
    assert len(view.fig.data[0].x) == len(clip.mouth["means"]) and view.fig.data[0].marker.color == "lightgrey"
    assert "no audio attention" in view.fig.layout.annotations[0].text
    view.show("face")
    assert view.branch.value == "face" and len(view.fig.data[1].x) == len(clip.face["means"])
    assert "expression attention" in view.fig.layout.annotations[1].text


# ---------------------------------------------------------------- incremental sampling
def test_sampling_view_replays_the_window(clip):
    rules = [WindowRule("lips", 0.0, 0.3, step=0.7 / 150, every=3),
             WindowRule("au45", 0.0, 0.3, step=0.7 / 150, every=4, descending=True)]
    sampler = IncrementalSampler(dict(lips=clip.opening, au45=clip.blink), rules, seed=1)
    view = SamplingView(sampler, 200, span=30)
    assert len(view.history) == 200 and len(view.fig.data[0].x) == TINY.n_frames
    view.slider.value = 90
    lo, hi = rules[0].window(90)
    assert np.allclose(view.fig.data[2].x, [lo, lo, hi, hi, lo]) and list(view.fig.data[7].x) == [90, 90]
    drawn = view.history[(view.history[:, 0] > 60) & (view.history[:, 0] <= 90), 2]
    m = sampler.metrics["lips"].numpy()
    assert np.allclose(np.sort(view.fig.data[1].x), np.sort(m[drawn])) and len(view.fig.data[1].x) == 30
    # window draws of rule 0 lie in their window whenever it holds a frame
    for k, r, f in view.history:
        if r == 0 and len(sampler.frames_in_window(rules[0], int(k))):
            a, b = rules[0].window(int(k)); assert a - 1e-9 <= m[f] <= b + 1e-9
    assert len(view.fig.data[4].x) == (view.history[:, 1] == 0).sum()
    view.rule.value = 1
    lo, hi = rules[1].window(90)
    assert np.allclose(view.fig.data[2].x, [lo, lo, hi, hi, lo]) and hi <= 1.0 and lo < 0.7
    assert np.allclose(np.asarray(view.fig.data[0].x), sampler.metrics["au45"].numpy())
    assert len(view.fig.data[4].x) == (view.history[:, 1] == 1).sum()


# ---------------------------------------------------------------- retrain
def test_train_photometric_without_fields_draws_every_frame(clip):
    out = train_photometric(clip, None, None, steps=TINY.n_frames)
    assert sorted(out["frames"]) == list(range(TINY.n_frames))                # uniform: one shuffled epoch
    # no field: every loss is canonical vs frame
    with torch.no_grad():
        canon = render_face_mouth(clip.face, clip.mouth, clip.viewmats, clip.Ks, TINY.size, TINY.size,
                                  background=clip.background, backend="torch")["image"][0]
    for j, loss in zip(out["frames"], out["losses"]):
        assert abs(loss - (canon - clip.frames[j]).abs().mean().item()) < 1e-6


def test_retrain_panel_button_runs_and_updates(clip):
    panel = RetrainPanel(clip, RetrainConfig(iterations=12, every=4))
    before = np.asarray(panel.frame_fig.data[1].z).copy()
    assert np.array_equal(before, np.asarray(panel.frame_fig.data[0].z))
    panel.mouth.value = False
    panel.lr_grid.value = 0.1
    cfg = panel.config()
    assert (cfg.face, cfg.mouth, cfg.iterations, cfg.every) == (True, False, 12, 4) and math.isclose(cfg.lr_grid, 0.1)
    panel.button.click()                                       # what clicking Train does
    assert set(panel.fields) == {"face"} and len(panel.result["losses"]) == 12
    assert (list(panel.loss_fig.data[0].x) == list(range(12))
            and np.allclose(panel.loss_fig.data[0].y, panel.result["losses"]))
    assert list(panel.loss_fig.data[1].x) == [0, 4, 8]                       # window iterations (every K = 4)
    assert not np.array_equal(np.asarray(panel.frame_fig.data[1].z), before)
    assert panel.status.value.startswith("done") and not panel.button.disabled
    assert math.isfinite(panel.result["psnr_after"])
    fig = panel.static()
    assert len(fig.axes) == 4


# ---------------------------------------------------------------- a trained head (chapter 30) in the explorer
def test_model_traces_of_a_trained_head_save_load_and_explore(clip64_once, tmp_path):
    from talkinggs.train import train, cpu_demo_train_config
    from talkinggs.model import model_store
    from talkinggs.traces import model_traces, save_traces, load_traces, lip_gap_correlation
    clip = clip64_once                        # the synthetic head at 64x64, preprocessed once per session: read only
    cfg = cpu_demo_train_config(face_iters=30, mouth_iters=6, fused_iters=2, face_points=400, mouth_points=50)
    head = train(clip, tmp_path / "run", cfg, device="cpu", progress=False)
    store = model_store(head, clip)
    tr = model_traces(head, store, frames=np.arange(10), size=24, n_other=50)
    nf, nm = len(head.face.splats["means"]), len(head.mouth.splats["means"])
    assert tr.d_means.shape == (10, len(tr.means), 3) and tr.renders.shape == tr.frames.shape == (10, 24, 24, 3)
    assert tr.regions["teeth"].sum() == min(nm, 25) and (tr.branch[tr.regions["teeth"]] == 1).all()
    assert not (tr.regions["lips"] & tr.regions["jaw"]).any() and (tr.branch[tr.regions["lips"]] == 0).all()
    assert (tr.index < nf + nm).all() and len(tr.waveform) == round(10 * store.meta["sample_rate"] / store.meta["fps"])
    save_traces(tr, tmp_path / "t.npz")
    back = load_traces(tmp_path / "t.npz")
    assert np.array_equal(back.d_means, tr.d_means) and np.abs(back.renders - tr.renders).max() <= 1 / 255
    if back.regions["lips"].sum() >= 2:                                   # the saved traces give the same number
        np.testing.assert_equal(lip_gap_correlation(back), lip_gap_correlation(tr))
    else:
        with pytest.raises(ValueError, match="lip Gaussians"): lip_gap_correlation(back)
    ex = TraceExplorer(back, region="lips")
    ex.set_frame(7)
    assert list(ex.trace_fig.data[ex._cursor[0]].x) == [7, 7]

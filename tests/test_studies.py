"""Tests of the studies chapter (34) at tiny size on the synthetic head (CPU, 64x64): the few-shot study with two
rows (TalkingGaussian's Table 4 variants; two training lengths for the split) and the `talkinggs study` command
around it."""
import json, subprocess, sys

import numpy as np
import pytest

from talkinggs.clip import FrameStore
from talkinggs.studies import fewshot, fewshot_split
from tiny import TINY   # tests/tiny.py

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "talkinggs", "study", *args], capture_output=True, text=True, cwd=cwd)


def test_fewshot_two_rows_two_lengths_and_the_command(clip64_once, tmp_path):
    clip = clip64_once                        # the synthetic head at 64x64, preprocessed once per session: read only
    out = tmp_path / "fs"
    res = fewshot(clip, out, lengths=(1,), test_seconds=1, rows=["table4_appearance", "table4_one_field"],
                  devices=["cpu"], base=TINY, train_frames=4)                      # two rows, one length: CI time
    assert [(r["train_seconds_clip"], r["row"]) for r in res] == [(1, "table4_appearance"), (1, "table4_one_field")]
    assert [r["config"]["method"] for r in res] == ["talkinggaussian_appearance", "talkinggaussian_one_field"]
    fewshot_split(clip, out / "data_2s", 2, 1)                                     # a second length: the same tail
    a, b = FrameStore(out / "data_1s", "cpu", progress=False), FrameStore(out / "data_2s", "cpu", progress=False)
    assert len(a.train_idx) == 25 and len(b.train_idx) == 50                       # the first 1 s and 2 s at 25 fps
    assert np.array_equal(a.test_idx, b.test_idx) and len(a.test_idx) == 25 and a.test_idx[0] >= 50   # one unseen tail
    assert all(r["test"]["frames"] == 25 and "test_static" not in r for r in res)   # the study skips static models
    saved = json.loads((out / "fewshot.json").read_text())
    assert saved["rows"] == ["table4_appearance", "table4_one_field"] and len(saved["results"]) == 2
    assert ("| train s | row | seed | PSNR | SSIM face | LPIPS | LMD | head PSNR | LMD centred |"
            in (out / "fewshot.md").read_text())
    assert (out / "fewshot.png").stat().st_size > 0
    r = cli("ablation", str(out / "data_1s"), "--out", str(out / "1s"), "--lip", cwd=tmp_path)   # an ablation folder
    assert r.returncode == 0 and "table4_one_field" in r.stdout, r.stderr[-500:]
    assert "TensorFlow Lite" not in r.stderr and "W0000" not in r.stderr      # mediapipe's C++ lines dropped
    with pytest.raises(ValueError, match="need 9 s"):
        fewshot(clip, tmp_path / "long", lengths=(7,), test_seconds=2, devices=["cpu"], base=TINY)
    r = cli("ablation", str(out / "data_1s"), "--out", str(tmp_path / "y"), "--config", "face_iter=3", cwd=tmp_path)
    assert (r.returncode == 2 and "--config takes name=value pairs of TrainConfig fields" in r.stderr
            and "Traceback" not in r.stderr)
    r = cli("fewshot", str(tmp_path / "missing.mp4"), "--out", "x", cwd=tmp_path)
    assert (r.returncode == 2 and "neither a video file nor a preprocessed clip" in r.stderr
            and not (tmp_path / "x").exists())
    r = cli("nope", cwd=tmp_path)
    assert r.returncode == 2 and "unknown study" in r.stderr

"""Tests of the ablation chapter (33) and its command: two rows of the synthetic head on the CPU, resumable, one
table."""
import json, subprocess, sys
from pathlib import Path

import pytest
import torch

from talkinggs.ablation import ROWS, Row, ablate, row_config, read_rows
from talkinggs.train import TrainConfig
from tiny import TINY   # tests/tiny.py

pytestmark = pytest.mark.usefixtures("one_thread")   # fixture in conftest.py


@pytest.fixture(scope="module")
def clip(clip64_once):
    "The committed synthetic talking head, preprocessed at 64x64 once per session (conftest.py): read only."
    return clip64_once


def test_rows_change_only_known_fields():
    for r in ROWS.values():
        cfg = row_config(r, seed=3)
        assert cfg.seed == 3 and all(getattr(cfg, k) == v for k, v in r.changes.items())
    # (the Table 4 rows train in test_studies.py)
    assert row_config(ROWS["table4_no_is"]).incremental_sampling is False
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        row_config(Row("typo", "", dict(pose_jont=True)))


def test_two_rows_one_table_and_no_retraining(clip, tmp_path):
    out = tmp_path / "abl"
    from scipy.io import wavfile
    sr, pcm = wavfile.read(clip / "audio.wav")
    novel = tmp_path / "novel.wav"                                       # any speech track: here 1.2 s of the clip's
    wavfile.write(novel, sr, pcm[: int(1.2 * sr)])
    res = ablate(clip, out, rows=["baseline", "random_bg"], devices=["cpu"], base=TINY, train_frames=6,
                 novel=str(novel))
    assert [r["row"] for r in res] == ["baseline", "random_bg"]
    assert [r["config"]["random_bg"] for r in res] == [False, True]
    assert all(r["config"]["face_iters"] == 30 and r["train"]["frames"] == 6 for r in res)
    # the static model too
    assert all(r["test_static"]["frames"] == r["test"]["frames"] and r["test_static"]["psnr_head"] > 0 for r in res)
    # the two rows trained different models: their test numbers differ
    assert res[0]["test"]["psnr_head"] != res[1]["test"]["psnr_head"]
    table = (out / "ablation.md").read_text().splitlines()
    assert (table[0].startswith("| row | seed | head PSNR") and "| LMD centred static |" in table[0]
            and [l.split("|")[1].strip() for l in table[2:4]] == ["baseline", "random_bg"])
    assert json.loads((out / "ablation.json").read_text())["rows"] == res
    stamp = (out / "baseline_s0" / "row.json").stat().st_mtime_ns
    again = ablate(clip, out, rows=["baseline"], devices=["cpu"], base=TINY)
    assert (out / "baseline_s0" / "row.json").stat().st_mtime_ns == stamp and again == res[:1]
    assert [r["row"] for r in read_rows(out)] == ["baseline", "random_bg"]
    # --novel: each row rendered frames driven by the other track; --lip (fill_lip_metrics) measures their lips
    frames = out / "baseline_s0" / "run" / "novel"
    info = json.loads((frames / "frames.json").read_text())
    assert res[0]["novel_audio"] == str(novel) and info["frames"] == len(list(frames.glob("*.png"))) == 30
    from talkinggs.ablation import fill_lip_metrics
    from talkinggs.evaluate import LIP_KEYS
    r = fill_lip_metrics(out)[0]
    assert r["novel"]["frames"] == 30 and r["novel"]["real_open_std"] > 0
    assert set(LIP_KEYS) <= set(r["test"])        # the lip numbers, the correlation's 95 % interval among them
    assert "| lip spread | lip spread new audio |" in (out / "ablation.md").read_text().splitlines()[0]


def test_cli_refuses_bad_rows_and_missing_data_without_writing(tmp_path):
    def run(*a):
        return subprocess.run([sys.executable, "-m", "talkinggs", "ablate", *a], capture_output=True, text=True,
                              cwd=tmp_path)
    r = run(str(tmp_path / "nodata"), "--out", "abl")
    assert r.returncode == 2 and "not a preprocessed clip" in r.stderr and not (tmp_path / "abl").exists()
    r = run(str(tmp_path), "--rows", "baseline,nope", "--out", "abl")
    assert r.returncode == 2 and "unknown rows ['nope']" in r.stderr and not (tmp_path / "abl").exists()
    r = run("--list_rows")
    assert r.returncode == 0 and all(name in r.stdout for name in ROWS)



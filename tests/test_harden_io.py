"""Failures a user met on a 2-core CPU: each is now one clear error (or a valid answer), and nothing is half-written.

Each test fails at 5a40316, the commit before the fixes (the commit messages give each case before and after).
Full and read-only disks are small tmpfs mounts in a user namespace (`unshare -rm`); those tests skip where that is
not allowed."""
import json, pickle, shutil, subprocess, sys, textwrap
from pathlib import Path

import numpy as np
import pytest

from talkinggs.samples import repo_root
from talkinggs.video import ffmpeg_exe

HEAD = repo_root() / "data_samples" / "synthetic_head"
VIDEO = HEAD / "video.mp4"


def ff(*args):
    "Run the bundled ffmpeg quietly (arguments after `ffmpeg -y -v error`)."
    subprocess.run([ffmpeg_exe(), "-y", "-v", "error", *map(str, args)], check=True)


def last_line(text):
    "The last stderr line that is not a warning or native log noise."
    lines = [l for l in text.splitlines() if l.strip() and not l.startswith((" ", "W0000", "INFO", "WARNING"))
             and "Warning" not in l]
    return lines[-1] if lines else ""


def in_small_disks(tmp_path, script, full_kb=100):
    """Run shell `script` where $FULL is a {full_kb} KiB tmpfs and $RO a read-only one (a user namespace);
    skips where unprivileged namespaces are not allowed."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("unshare -rm (unprivileged user and mount namespaces) is not allowed here")
    full, ro = tmp_path / "full", tmp_path / "ro"
    full.mkdir()
    ro.mkdir()
    setup = (f"mount -t tmpfs -o size={full_kb}k none {full} && mount -t tmpfs -o ro,size=64k none {ro} && "
             f"export FULL={full} RO={ro} && ")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", setup + script], capture_output=True, text=True)
    if "mount:" in r.stderr and "permission denied" in r.stderr.lower():
        pytest.skip("tmpfs cannot be mounted in a user namespace here")
    return r


# ---------------------------------------------------------------- lip sync as JSON
# before: NaN (not JSON) for silent audio, and r = 1.0 for a 2-frame video

def test_mouth_audio_sync_is_strict_json_with_a_reason(tmp_path):
    from talkinggs.evaluate import mouth_audio_sync
    ff("-i", VIDEO, "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-map", "0:v", "-map", "1:a", "-shortest",
       "-c:v", "copy", "-c:a", "aac", tmp_path / "silent.mp4")
    ff("-i", VIDEO, "-frames:v", "2", "-t", "0.08", tmp_path / "two.mp4")
    silent = mouth_audio_sync(tmp_path / "silent.mp4", size=128, max_frames=40)   # a video alone, no run folder
    two = mouth_audio_sync(tmp_path / "two.mp4", size=128)
    for r in (silent, two): json.dumps(r, allow_nan=False)                     # NaN is not JSON
    assert silent["corr"] is None and silent["corr_note"] == "the audio is silent", silent
    assert two["frames"] == 2 and two["corr"] is None and two["corr_note"].startswith("too few frames"), two
    spoken = mouth_audio_sync(VIDEO, size=128, max_frames=40)
    assert isinstance(spoken["corr"], float) and spoken["corr_note"] is None, spoken


def test_correlation_gives_none_and_why():
    from talkinggs.metrics import correlation
    assert correlation([1, 2], [2, 1]) == (None, "too few frames (2 usable, need 3)")
    names = ("the lips", "the audio energy")
    assert correlation([1, 2, 3, 4], [0, 0, 0, 0], names) == (None, "the audio energy is constant")
    assert correlation([1, np.nan, 3, 4], [2, 5, 6, 8])[0] == pytest.approx(1.0, abs=0.02)


# ---------------------------------------------------------------- benchmark arguments
# before: --repeats 0 failed after printing ("no median for empty data"), a refused report left an empty folder and
# suggested --overwrite or --resume (bench has neither), and Ctrl-C left a half-trained run

def test_bench_render_refuses_bad_counts_before_printing(capsys):
    from talkinggs.bench import bench_render
    for kw, msg in ((dict(repeats=0), "repeats must be an integer of at least 1, got 0"),
                    (dict(ns=(100, 0)), "ns must be an integer of at least 1, got 0"),
                    (dict(ns=()), "give at least one scene size"),
                    (dict(backends=["gsplat"]), "backend gsplat needs a CUDA device")):
        with pytest.raises(ValueError, match=msg):
            bench_render(**{"ns": (100,), "size": 16, "device": "cpu", **kw})
    assert capsys.readouterr().out == ""                                # not a table header first


def test_bench_report_refuses_before_making_any_folder(tmp_path):
    from talkinggs.bench import bench_report
    with pytest.raises(FileNotFoundError, match="nowhere is not a preprocessed clip"):
        bench_report(tmp_path / "nowhere", tmp_path / "bench", device="cpu")
    data = tmp_path / "clip"
    data.mkdir()
    (data / "meta.json").write_text("{}")
    with pytest.raises(FileExistsError) as e:                            # --video needs a new data folder
        bench_report(data, tmp_path / "bench", video=VIDEO, device="cpu")
    assert "--overwrite" not in str(e.value) and "overwrite=True" not in str(e.value) and "--path" in str(e.value)
    (tmp_path / "old" / "run").mkdir(parents=True)
    with pytest.raises(FileExistsError) as e:                            # an earlier report's run
        bench_report(data, tmp_path / "old", device="cpu")
    assert "--resume" not in str(e.value) and "--out" in str(e.value)
    with pytest.raises(ValueError, match="repeats must be"):
        bench_report(data, tmp_path / "bench", repeats=0, device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip", "old"]   # no empty bench folder


def test_bench_report_interrupted_keeps_no_partial_run(tmp_path, monkeypatch):
    import talkinggs.train as train_mod
    from talkinggs.bench import bench_report
    from talkinggs.bookkeeping import Interrupted
    data = tmp_path / "clip"
    data.mkdir()
    (data / "meta.json").write_text("{}")
    def ctrl_c(data, run, *a, **k):                                      # Ctrl-C after the first checkpoint
        (Path(run) / "face.ckpt.pt").parent.mkdir(parents=True)
        (Path(run) / "face.ckpt.pt").write_bytes(b"x")
        raise KeyboardInterrupt
    monkeypatch.setattr(train_mod, "train", ctrl_c)
    with pytest.raises((Interrupted, KeyboardInterrupt)) as e:           # Interrupted: the CLI's one line
        bench_report(data, tmp_path / "bench", device="cpu")
    assert e.type is Interrupted and "bench report interrupted; no partial run is left in" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]

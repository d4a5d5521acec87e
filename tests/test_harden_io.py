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


# ---------------------------------------------------------------- writing videos
# before: a full disk gave a broken mp4 and exit 0 (`render` printed "126 frames"), a read-only folder "Broken pipe"

WRITE = textwrap.dedent("""
    import os, sys, numpy as np
    from talkinggs.video import write_video
    frames = [np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8) for i in range(126)]
    for d in sys.argv[1:]:
        try: print("WROTE", write_video(frames, f"{d}/a.mp4"))
        except Exception as e: print("ERROR", type(e).__name__, e)
        print("LEFT", sorted(os.listdir(d)))
    try:                                          # np.save to a path: only numpy's "... requested and ... written"
        from pathlib import Path
        from talkinggs.preprocess import _save
        _save(Path(sys.argv[1]) / "landmarks.npy", np.save, np.zeros(200_000))
    except Exception as e: print("ERROR", type(e).__name__, e)
    """)


def test_video_writer_on_a_full_or_read_only_disk_raises_one_error_and_leaves_nothing(tmp_path):
    (tmp_path / "w.py").write_text(WRITE)
    r = in_small_disks(tmp_path, f'{sys.executable} {tmp_path / "w.py"} "$FULL" "$RO"')
    out = r.stdout.splitlines()
    assert r.returncode == 0 and len(out) == 5, r.stdout + r.stderr[-2000:]
    assert out[0] == f"ERROR WriteError disk full while writing {tmp_path / 'full' / 'a.mp4'}", out   # not "126 frames"
    assert out[2] == f"ERROR WriteError read-only file system while writing {tmp_path / 'ro' / 'a.mp4'}", out
    assert out[1] == out[3] == "LEFT []", out                           # no broken a.mp4, no .part file
    assert "Broken pipe" not in r.stderr and "[out#0" not in r.stderr, r.stderr[-2000:]   # ffmpeg's log is ours
    assert out[4] == f"ERROR WriteError disk full while writing {tmp_path / 'full' / 'landmarks.npy'}", out[4]


def test_render_into_a_read_only_folder_is_one_line_before_any_work(tmp_path):
    r = in_small_disks(tmp_path, f'{sys.executable} -m talkinggs render {tmp_path / "no_run"} --out "$RO/a.mp4"')
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert last_line(r.stderr) == f"talkinggs render: error: read-only file system while writing {tmp_path}/ro/a.mp4"


def test_the_written_video_is_read_back_and_counted(tmp_path, monkeypatch):
    import talkinggs.video as v
    from talkinggs.video import WriteError, write_video
    frames = [np.full((32, 32, 3), 10 * i, np.uint8) for i in range(6)]
    assert v._count_frames(write_video(frames, tmp_path / "ok.mp4")) == 6
    monkeypatch.setattr(v, "_count_frames", lambda path: 5)            # a file that lost a frame on the way
    with pytest.raises(WriteError, match=r"the written file holds 5 of 6 frames while writing .*bad\.mp4"):
        write_video(frames, tmp_path / "bad.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.mp4"]


def test_write_errors_name_the_cause():
    import errno
    from talkinggs.video import WriteError, write_cause, writing
    assert write_cause(OSError(errno.ENOSPC, "No space left on device")) == ("disk full", errno.ENOSPC)
    log = "[out#0/mp4 @ 0x55] Error opening output /x/.a.part.mp4: Permission denied\nError opening output files"
    assert write_cause(log) == ("no permission", errno.EACCES)                 # ffmpeg's log quotes the C library
    assert write_cause("[vost#0:0 @ 0x5] Unknown encoder 'x'") == ("Unknown encoder 'x'", None)
    with pytest.raises(WriteError) as info, writing("/data/clip/frames/000001.jpg"):
        raise OSError(errno.EROFS, "Read-only file system")
    e = info.value
    assert str(e) == "read-only file system while writing /data/clip/frames/000001.jpg" and e.errno == errno.EROFS
    back = pickle.loads(pickle.dumps(e))                                # from preprocessing's helper process
    assert isinstance(back, WriteError) and str(back) == str(e) and isinstance(back, OSError)


# ---------------------------------------------------------------- video input
# before: a full disk crashed preprocessing (SIGBUS) or said "161280 requested and 35808 written"; a rotated phone
# clip was read sideways; 3.96 s was "4.0 s long"; a portrait clip lost forehead and chin

def test_preprocess_on_a_full_disk_names_the_file_and_leaves_nothing(tmp_path):
    r = in_small_disks(tmp_path, f'{sys.executable} -m talkinggs preprocess {VIDEO} --out "$FULL/clip" --size 64 '
                                 f'--quiet; echo "exit $?"; ls -A "$FULL"')
    out = r.stdout.splitlines()
    assert out == ["exit 2"], r.stdout + r.stderr[-2000:]              # no SIGBUS (exit 135), no partial folder
    assert "Traceback" not in r.stderr and "requested and" not in r.stderr, r.stderr[-2000:]
    msg = last_line(r.stderr)
    assert msg.startswith(f"talkinggs preprocess: error: disk full while writing {tmp_path}/full/clip/"), msg


def test_a_rotated_phone_clip_is_read_upright(tmp_path):
    from talkinggs.video import probe_video, scan_faces, crop_box, iter_frames
    ff("-i", VIDEO, "-vf", "pad=128:192:0:32", "-c:a", "copy", tmp_path / "upright.mp4")   # portrait, as seen
    ff("-i", tmp_path / "upright.mp4", "-vf", "transpose=clock", "-c:a", "copy", tmp_path / "stored.mp4")
    ff("-display_rotation", "90", "-i", tmp_path / "stored.mp4", "-c", "copy", tmp_path / "phone.mp4")
    info = probe_video(tmp_path / "phone.mp4")                          # stored 192x128, shown 128x192
    assert (info.width, info.height) == (128, 192), info
    scan = scan_faces(info, progress=False)
    box = crop_box(scan, info.width, info.height)
    inside = box[0] >= 0 and box[1] >= 0 and box[0] + box[2] <= 128 and box[1] + box[2] <= 192
    assert scan.found.mean() == 1.0 and inside, (scan.found.mean(), box)
    a = next(iter_frames(tmp_path / "phone.mp4", crop=box, size=64)).astype(float)
    b = next(iter_frames(tmp_path / "upright.mp4", crop=box, size=64)).astype(float)
    assert np.abs(a - b).mean() < 4                                      # the same upright picture


def test_a_clip_just_under_the_minimum_says_how_long_it_is():
    from talkinggs.video import VideoError, VideoInfo, check_header
    for seconds, shown in ((3.96, "3.96"), (3.999, "3.99")):
        with pytest.raises(VideoError, match=rf"clip is {shown} s long; need at least 4 s"):
            check_header(VideoInfo("phone.mp4", 640, 360, 30.0, seconds, "h264", "aac"))


def test_a_portrait_clip_keeps_the_whole_face_and_says_the_frame_is_too_narrow(tmp_path, monkeypatch):
    import talkinggs.preprocess as pp
    from talkinggs.video import FaceScan, crop_box
    narrow = FaceScan(np.ones(3, bool), np.array([[10, 100, 170, 300]] * 3, np.float32), 3)   # a 200 px face
    x0, y0, side = crop_box(narrow, 180, 400)                            # in a 180 px wide frame
    assert (x0, side) == (-75, 330)                                      # not cut to 180 px: 1.65 x the face
    from talkinggs.video import crop_padding
    assert crop_padding((x0, y0, side), 180, 400) == (75, 0, 75, 0)
    ff("-i", VIDEO, "-vf", "scale=352:352,crop=288:352,pad=288:512:0:80", "-c:a", "copy", tmp_path / "portrait.mp4")
    seen, real = {}, pp.iter_frames
    class Stop(Exception): pass
    def first_frame_only(video, fps, crop, size):                        # stop preprocessing after the crop
        seen["box"], seen["frame"] = crop, next(real(video, fps, crop=crop, size=size))
        raise Stop
    monkeypatch.setattr(pp, "iter_frames", first_frame_only)
    with pytest.warns(UserWarning) as rec, pytest.raises(Stop):
        pp.preprocess(tmp_path / "portrait.mp4", tmp_path / "out", cfg=pp.PreprocessConfig(size=64), progress=False)
    msgs = [str(w.message) for w in rec]
    assert any("the 288x512 frame is too narrow for the crop: the face is" in m for m in msgs), msgs
    x0, y0, side = seen["box"]
    assert side > 288 and x0 < 0 and x0 + side > 288                     # wider than the frame on both sides
    img = seen["frame"]                                                  # [64, 64, 3]: black bars left and right
    assert img.shape == (64, 64, 3) and img[:, :3].max() < 20 and img[:, -3:].max() < 20 and img[:, 24:40].mean() > 60
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


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

"""`talkinggs ablate` and `talkinggs study` against a rerun with other settings, failed rows, bad devices and seeds, two
writers, Ctrl-C / SIGTERM and a clip too short for the study (chapters 33, 34, 99).

Most tests train nothing: their data folder is a bare meta.json (so a row that starts fails at once, loading frames)
or their rows are made by hand in the format `run_row` writes. Only the two stop tests train, on the synthetic head."""
import json, os, signal, socket, subprocess, sys, time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from talkinggs.ablation import ROWS, row_config
from talkinggs.bookkeeping import data_checksum
from talkinggs.samples import repo_root
from talkinggs.train_config import resolve_config
from tiny import TINY, TINY_FLAG   # tests/tiny.py

VIDEO = repo_root() / "data_samples" / "synthetic_head" / "video.mp4"


def one_line(err: str, *needles) -> None:
    "A single stderr line, no traceback, holding every needle."
    lines = [s for s in err.splitlines() if s.strip()]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), err[-2000:]


@pytest.fixture
def fake(fake_clip) -> Path:
    "conftest's fake clip (meta.json only), under the short name these tests use."
    return fake_clip


def made_row(out: Path, data: Path, name: str = "baseline", **changes) -> Path:
    """A finished row as `run_row` and `train` leave it (row.json, run/config.json), trained on `data` with TINY +
    changes."""
    row, base = ROWS[name], {**TINY, **changes}
    folder = out / f"{name}_s0"
    (folder / "run").mkdir(parents=True)
    res = dict(row=name, seed=0, cause=row.cause, changes=row.changes, base=base, data=str(data.resolve()),
               train_seconds=1.0, test=dict(psnr_head=20.5), train=dict(psnr_head=21.0),
               config=asdict(row_config(row, 0, base)), device="cpu")
    (folder / "row.json").write_text(json.dumps(res))
    n_train = json.loads((data / "meta.json").read_text())["split"]["train"][1]
    cfg = resolve_config(row_config(row, 0, base), n_train)
    info = dict(train=asdict(cfg), data=str(data.resolve()), data_checksum=data_checksum(data))
    (folder / "run" / "config.json").write_text(json.dumps(info))
    return folder


# 1. a rerun into the same --out
def test_rerun_reuses_a_row_only_with_the_same_config_and_data(fake, tmp_path, cli):
    out = tmp_path / "A"
    folder = made_row(out, fake)
    stamp = (folder / "row.json").stat().st_mtime_ns
    code, table, err = cli(["ablate", fake, "--out", out, "--rows", "baseline", "--config", TINY_FLAG])
    assert code == 0 and "| baseline | 0 | 20.50 |" in table, err                       # the same: read back
    other = tmp_path / "fake2"
    other.mkdir()
    meta = json.loads((fake / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps(meta | dict(sample_rate=22050)))          # other data
    code, table, err = cli(["ablate", other, "--out", out, "--rows", "baseline", "--config",
                            f"{TINY_FLAG},random_bg=true"])
    assert code == 2 and not table
    one_line(err, f"{folder} was made with random_bg=False (now True), data {fake.resolve()} (now {other.resolve()})",
             "--redo")
    code, _, err = cli(["ablate", fake, "--out", out, "--rows", "baseline", "--config", f"{TINY_FLAG},face_iters=31"])
    assert code == 2
    one_line(err, "face_iters=30 (now 31)")
    (fake / "audio_feats.npy").write_bytes(b"new")                                        # the same folder, new content
    code, _, err = cli(["ablate", fake, "--out", out, "--rows", "baseline", "--config", TINY_FLAG])
    assert code == 2
    one_line(err, f"data {fake.resolve()} (its files changed since)")
    assert (folder / "row.json").stat().st_mtime_ns == stamp and not (folder / "lock.json").exists()
    # --redo: the row is deleted and trained again (here it fails at once: the folder has no frames)
    code, table, err = cli(["ablate", other, "--out", out, "--rows", "baseline", "--redo", "--config", TINY_FLAG])
    assert code == 1 and not (folder / "row.json").exists() and (folder / "error.txt").is_file(), err


def test_a_failed_row_is_tried_again_with_the_config_given_now(fake, tmp_path, cli):
    out = tmp_path / "A"
    folder = made_row(out, fake, face_iters=31)
    (folder / "row.json").unlink()
    (folder / "error.txt").write_text("Traceback (most recent call last):\n  ...\nRuntimeError: out of memory\n")
    code, _, err = cli(["ablate", fake, "--out", out, "--rows", "baseline", "--config", TINY_FLAG])
    # tried again from scratch with face_iters=30: its old run (face_iters=31) is gone, the new error is a new one
    assert code == 1 and not (folder / "run" / "config.json").exists(), err
    first = (folder / "error.txt").read_text().splitlines()[0]
    assert "out of memory" not in first and "cannot change" not in first and first in err, err


# 2. every row failed; devices and configs checked first
def test_failed_rows_are_listed_marked_and_exit_1(fake, tmp_path, cli):
    out = tmp_path / "A"
    code, table, err = cli(["ablate", fake, "--out", out, "--rows", "baseline,random_bg", "--devices", "cpu",
                            "--config", TINY_FLAG])
    lines = err.splitlines()
    assert code == 1 and "2 row(s) failed" in lines[0] and "Traceback" not in err, err
    firsts = [(out / f"{r}_s0" / "error.txt").read_text().splitlines()[0] for r in ("baseline", "random_bg")]
    assert lines[1:] == [f"  {out / 'baseline_s0'}: {firsts[0]}", f"  {out / 'random_bg_s0'}: {firsts[1]}"]
    assert f"| baseline | 0 | failed: {firsts[0]} |" in table
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["rows"] == [] and [f["row"] for f in saved["failed"]] == ["baseline", "random_bg"]
    code, table, err = cli(["study", "fewshot", fake, "--out", tmp_path / "S", "--lengths", "1", "--test_seconds", "1",
                            "--rows", "baseline", "--config", TINY_FLAG])
    assert code == 1 and "1 row(s) failed" in err and "| 1 | baseline | 0 | failed: " in table, err
    study = json.loads((tmp_path / "S" / "fewshot.json").read_text())
    assert study["failed"][0]["train_seconds_clip"] == 1 and study["failed"][0]["error"] in err


@pytest.mark.parametrize("argv, needle", [
    (["ablate", "{fake}", "--devices", "banana"], "unknown device 'banana'"),
    (["ablate", "{fake}", "--rows", "baseline", "--config", "method=bogus"], "row baseline: unknown method 'bogus'"),
    (["ablate", "{fake}", "--devices", "cpu,cpu", "--seeds", "0,0"], "seed 0 is given twice"),
    (["study", "fewshot", "{fake}", "--test_seconds", "-1", "--lengths", "1"], "must be positive seconds"),
    (["study", "fewshot", "{fake}", "--lengths", "1,1", "--test_seconds", "1"], "1 s is given twice"),
    (["study", "ablation", "{fake}", "--seeds", "1.5"], "--seeds takes comma-separated ints"),
])
def test_bad_arguments_are_one_line_before_any_work(fake, tmp_path, cli, argv, needle):
    out = tmp_path / "out"
    code, _, err = cli([a.format(fake=fake) for a in argv] + ["--out", out])
    assert code == 2, err
    one_line(err, needle)
    assert not out.exists()


def test_cuda_devices(fake, tmp_path, cli, monkeypatch):
    if not torch.cuda.is_available():
        code, _, err = cli(["ablate", fake, "--out", tmp_path / "out", "--devices", "cuda"])
        assert code == 2 and not (tmp_path / "out").exists()
        one_line(err, "sees no CUDA GPU")
    from talkinggs.core import check_devices
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)                         # a two-GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_devices(["cuda", "cuda:1", "cpu"]) == ["cuda:0", "cuda:1", "cpu"]       # set_device needs an index
    with pytest.raises(ValueError, match="only 2 CUDA GPU"):
        check_devices(["cuda:2"])


# 3. two writers
def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(fake, tmp_path, cli):
    out = tmp_path / "A"
    folder = made_row(out, fake)
    lock = folder / "lock.json"
    lock.write_text(json.dumps(dict(pid=os.getpid(), host=socket.gethostname())))         # a live holder: this test
    code, _, err = cli(["ablate", fake, "--out", out, "--rows", "baseline", "--config", TINY_FLAG])
    assert code == 2 and lock.exists()
    one_line(err, f"(pid {os.getpid()} on {socket.gethostname()})", "wait for it")
    lock.write_text(json.dumps(dict(pid=2**22 + 1, host=socket.gethostname())))           # above any pid: long gone
    code, table, err = cli(["ablate", fake, "--out", out, "--rows", "baseline", "--config", TINY_FLAG])
    assert code == 0 and "| baseline | 0 | 20.50 |" in table and not lock.exists(), err


# 5. nothing half-written
def test_fewshot_checks_seeds_and_a_short_video_before_writing(fake, tmp_path, cli):
    from talkinggs.studies import fewshot
    for seeds in (("x",), (1.5,), (-1,)):
        with pytest.raises(ValueError, match="whole numbers"):
            fewshot(fake, tmp_path / "S", lengths=(1,), test_seconds=1, rows=["baseline"], seeds=seeds, devices=["cpu"])
        assert not (tmp_path / "S").exists()
    t0 = time.time()
    code, _, err = cli(["study", "fewshot", VIDEO, "--out", tmp_path / "S"])      # a 5 s video, 40 s needed
    assert code == 2 and not (tmp_path / "S").exists() and time.time() - t0 < 20          # refused before preprocessing
    one_line(err, "the clip is 5.1 s", "need 40 s", "shorter --lengths")


# 4. Ctrl-C and SIGTERM (these two train, on the synthetic head at 64x64)
@pytest.fixture(scope="module")
def clip(clip64_once):
    "The committed synthetic talking head, preprocessed at 64x64 once per session (conftest.py): read only."
    return clip64_once


def children(pid: int) -> list[int]:
    "The processes whose parent is `pid` (Linux /proc)."
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try: ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError): continue
        if ppid == pid: kids.append(int(stat.parent.name))
    return kids


def gone(pid: int, seconds: float = 10) -> bool:
    "Whether process `pid` ends within `seconds`."
    t0 = time.time()
    while time.time() - t0 < seconds:
        try: os.kill(pid, 0)
        except ProcessLookupError: return True
        if (Path(f"/proc/{pid}/stat").is_file()
                and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"):
            return True                                                                    # a zombie: it has ended
        time.sleep(0.1)
    return False


def stop_mid_run(clip, out, devices, sig, rows=("baseline", "random_bg"), wait_for=1):
    "Start `talkinggs ablate` on long rows, send `sig` once `wait_for` rows have a checkpoint; (exit status, stderr)."
    long = f"{TINY_FLAG},face_iters=100000,ckpt_every=1"
    env = os.environ | dict(OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "talkinggs", "ablate", str(clip), "--out", str(out),
                          "--rows", ",".join(rows), "--devices", devices, "--config", long],
                         stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # Ctrl-C as in a terminal,
                                                                    # even when the tests run as a background job
    try:
        t0 = time.time()
        while len(list(out.glob("*_s0/run/face.ckpt.pt"))) < wait_for and p.poll() is None and time.time() - t0 < 120:
            time.sleep(0.2)
        kids = children(p.pid)
        p.send_signal(sig)
        t1 = time.time()
        err = p.communicate(timeout=60)[1]
        assert time.time() - t1 < 30, "it did not stop at once"
        assert all(gone(k) for k in kids), "a worker process outlived its command"
        return p.returncode, err
    finally:
        if p.poll() is None:
            p.kill()


def check_stopped(out, trained, code, err):
    assert code == 130, err[-2000:]
    one_line("\n".join(s for s in err.splitlines() if "Warning" not in s and not s.startswith("  ")),
             "talkinggs ablate: interrupted", "run the same command again")
    for name in trained:
        ckpt = torch.load(out / f"{name}_s0" / "run" / "face.ckpt.pt", weights_only=False)   # intact
        assert ckpt["step"] >= 1
        assert not {"row.json", "error.txt", "lock.json"} & {p.name for p in (out / f"{name}_s0").iterdir()}


def test_ctrl_c_stops_at_once_keeping_checkpoints(clip, tmp_path):
    out = tmp_path / "A"
    code, err = stop_mid_run(clip, out, "cpu", signal.SIGINT)
    check_stopped(out, ["baseline"], code, err)
    assert not (out / "random_bg_s0").exists()                                           # never started: no folder


def test_sigterm_stops_every_worker(clip, tmp_path):
    out = tmp_path / "A"
    code, err = stop_mid_run(clip, out, "cpu,cpu", signal.SIGTERM, wait_for=2)
    check_stopped(out, ["baseline", "random_bg"], code, err)

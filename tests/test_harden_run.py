"""Run folders under stress: a full disk during a save, two writers in one folder, --parallel without two GPUs.
Each test failed before the fix it checks (chapters 04 and 30)."""
import errno, json, os, socket, subprocess, sys, time
from pathlib import Path

import pytest
import torch

from talkinggs.bookkeeping import FolderBusy, WriteFailed, atomic_save, atomic_write_text, folder_lock, load_checkpoint
from talkinggs.train import train


def test_a_save_onto_a_full_disk_says_so_and_leaves_the_old_file(tmp_path, monkeypatch):
    atomic_save({"step": 1}, tmp_path / "face.ckpt.pt")

    def full(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(WriteFailed, match="face.ckpt.pt: the disk is full"):
        atomic_save({"step": 2}, tmp_path / "face.ckpt.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["face.ckpt.pt"]       # no .tmp-PID left behind
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "face.ckpt.pt")["step"] == 1


def test_a_text_write_into_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(WriteFailed, match="cannot write"):
        atomic_write_text("{}", tmp_path / "gone" / "config.json")


def _hold(folder: Path, seconds: float) -> subprocess.Popen:
    "Another process that holds `folder`'s lock for `seconds` (returns once it holds it)."
    code = ("import sys, time\nfrom talkinggs.bookkeeping import folder_lock\n"
            f"with folder_lock({str(folder)!r}, 'train'):\n    print('held', flush=True)\n    time.sleep({seconds})\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "R"
    holder = _hold(run, 30)
    try:
        with pytest.raises(FolderBusy, match=f"in use by train \\(pid {holder.pid} on"):
            train(tmp_path / "no_data", run, resume=True, progress=False)
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "R"
    run.mkdir()
    (run / "lock.json").write_text(json.dumps(dict(pid=dead.pid, host=socket.gethostname(), what="train", since="x")))
    with pytest.raises(FileNotFoundError, match="not a preprocessed clip"):     # past the lock, to the data check
        train(tmp_path / "no_data", run, resume=True, progress=False)
    assert not (run / "lock.json").exists()


def test_a_lock_from_another_host_is_left_alone(tmp_path):
    (tmp_path / "lock.json").write_text(json.dumps(dict(pid=1, host="elsewhere", what="ablate", since="x")))
    with pytest.raises(FolderBusy, match="if no such process runs, delete"):
        with folder_lock(tmp_path): pass
    assert (tmp_path / "lock.json").exists()


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has two GPUs: --parallel can run here")
def test_parallel_without_two_gpus_is_refused_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, "-m", "talkinggs", "train", str(tmp_path / "no_data"), "--out",
                        str(tmp_path / "R"), "--parallel"], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--parallel" in lines[0] and "two GPUs" in lines[0], r.stderr
    assert not (tmp_path / "R").exists()


def test_a_kill_before_the_first_checkpoint_is_one_line_and_leaves_nothing(clip64_once, tmp_path):
    run = tmp_path / "R"
    cmd = [sys.executable, "-m", "talkinggs", "train", str(clip64_once), "--out", str(run), "--quiet",
           "--face_iters", "50", "--mouth_iters", "5", "--fused_iters", "0",
           "--config", "pose_refine=false,face_points=300,mouth_points=60"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not run.exists() and p.poll() is None and time.time() - t0 < 120: time.sleep(0.005)
    p.send_signal(15)                                   # SIGTERM as soon as the run folder exists
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, (p.returncode, err[-2000:])
    lines = [l for l in err.splitlines() if "interrupted" in l]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    if not any(run.glob("*.pt")): assert not run.exists()              # nothing half-made is left behind
    else: assert "continue with --resume" in lines[0]                  # or a checkpoint to continue from

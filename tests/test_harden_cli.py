"""The command line under misuse (chapter 99): each case one line on stderr and exit 2, or a valid result.
Each test failed at 5a40316 (eval needed a run folder for --sync; a demo rerun with other settings was refused with
train's --resume advice, which the demo command does not have)."""
import json, subprocess, sys
from pathlib import Path

from talkinggs.samples import repo_root

HEAD = repo_root() / "data_samples" / "synthetic_head"


def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "talkinggs", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def _one_line(r: subprocess.CompletedProcess, *words: str) -> str:
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("talkinggs ")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def test_eval_sync_needs_only_a_video():
    r = _cli("eval", "--sync", HEAD / "video.mp4")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])                 # valid JSON, a number or null with a reason
    assert {"frames", "corr"} <= set(res) and (res["corr"] is not None or res.get("corr_note")), res


def test_eval_without_a_run_or_sync_is_one_line():
    _one_line(_cli("eval"), "give RUN", "--sync")


def test_a_demo_rerun_with_other_settings_is_refused_by_name(tmp_path):
    out = tmp_path / "demo"
    (out / "data").mkdir(parents=True)
    (out / "data" / "meta.json").write_text("{}")                      # as if preprocessed: the check comes first
    (out / "run").mkdir()
    (out / "run" / "config.json").write_text(json.dumps({"train": {"face_iters": 30}}))
    _one_line(_cli("demo", "--out", out, "--face_iters", 40, "--quiet"), "--face_iters 30", "another --out")


def test_ablate_into_a_folder_it_cannot_make_is_one_line(fake_clip, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")                  # OUT below a file: mkdir fails (an OSError)
    _one_line(_cli("ablate", fake_clip, "--out", tmp_path / "a_file" / "A", "--rows", "baseline", "--devices", "cpu"),
              "talkinggs ablate: error", "a_file")


def test_ablate_refuses_new_audio_that_does_not_decode_before_training(fake_clip, tmp_path):
    (tmp_path / "voice.wav").write_text("not audio")                  # named like speech; before, the rows trained
    _one_line(_cli("ablate", fake_clip, "--out", tmp_path / "A", "--rows", "baseline", "--devices", "cpu",
                   "--novel", tmp_path / "voice.wav"), "--novel voice.wav: no decodable audio")
    assert not (tmp_path / "A").exists()                              # refused before any row folder was made

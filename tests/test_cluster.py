"""Chapter 33a on a real Ray cluster of this machine with two CPU workers: ablation rows as Ray tasks, run through the
`talkinggs` command (in this process, and from a second process that connects to the running cluster)."""
import json, os, signal, subprocess, sys, tempfile, time
from pathlib import Path

import pytest
from tiny import TINY_FLAG   # tests/tiny.py


ray = pytest.importorskip("ray", reason='Ray is an optional extra: pip install -e ".[cluster]" ([dev] has it too)')


@pytest.fixture(scope="module")
def cluster():
    "A Ray cluster of this machine with two CPUs for this module (this process is its first driver); its address."
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def table_rows(md: str) -> list[str]:
    "The row names of an ablation.md table."
    return [line.split("|")[1].strip() for line in md.splitlines()[2:] if line.startswith("| ")]


def test_two_rows_as_tasks_one_table_and_a_rerun_trains_nothing(cluster, clip64_once, tmp_path, cli):
    """Two rows side by side on the two CPUs, the clip shipped with the tasks; the local path gives their numbers; then
    the same rows by path: reused."""
    from talkinggs.studies import fewshot_split
    # a view of the clip (links to its files) tested on its last 3 frames: the test poses' correction is most of a row
    view = fewshot_split(clip64_once, tmp_path / "view", train_seconds=4, test_seconds=0.12)
    out, clip = tmp_path / "abl", str(view.resolve())
    before = set(Path(tempfile.gettempdir()).glob("talkinggs_data_*"))
    code, table, err = cli(["ablate", view, "--out", out, "--rows", "baseline,no_lip_term", "--config", TINY_FLAG,
                            "--cluster", "ray", "--ship_data"])
    assert code == 0, err
    rows = [json.loads((out / f"{r}_s0" / "row.json").read_text()) for r in ("baseline", "no_lip_term")]
    assert [r["row"] for r in rows] == ["baseline", "no_lip_term"]
    assert [r["config"]["lip_landmark_weight"] > 0 for r in rows] == [True, False]
    assert all(r["config"]["face_iters"] == 30 and r["device"] == "cpu" and r["test"]["psnr_head"] > 0 for r in rows)
    assert all(r["test"]["frames"] == 3 for r in rows)
    assert table_rows(table) == ["baseline", "no_lip_term"] and table == (out / "ablation.md").read_text() + "\n"
    assert json.loads((out / "ablation.json").read_text())["rows"] == rows
    done = [line for line in err.splitlines() if line.startswith("[")]          # one line per task as it ends
    assert (sorted(line[:5] for line in done) == ["[1/2]", "[2/2]"]
            and all(line.endswith(": done") for line in done)), err
    assert not list(out.glob("*/lock.json")) and not list(out.glob("*/error.txt"))
    # the local path on the same rows gives the same numbers (the CPU is deterministic; a Ray worker's one thread sums
    # in another order: 1e-5 dB measured on the synthetic head)
    code, _, err = cli(["ablate", view, "--out", tmp_path / "local", "--rows", "baseline,no_lip_term", "--config",
                        TINY_FLAG, "--devices", "cpu"])
    assert code == 0, err
    for r in rows:
        here = json.loads((tmp_path / "local" / f"{r['row']}_s0" / "row.json").read_text())["test"]
        assert all(abs(here[k] - v) < 1e-3 for k, v in r["test"].items() if k.startswith(("psnr", "ssim"))), (here, r)
    # trained from a shipped copy, yet every JSON names the clip by its path, and the copy is gone
    run_cfg = json.loads((out / "baseline_s0" / "run" / "config.json").read_text())
    assert rows[0]["data"] == run_cfg["data"] == clip and rows[0]["data_checksum"] == run_cfg["data_checksum"]
    assert not any("talkinggs_data_" in p.read_text() for p in out.rglob("*.json"))
    assert set(Path(tempfile.gettempdir()).glob("talkinggs_data_*")) == before
    # the same rows, the data read by its path on the node: the same rows, reused
    stamps = [(out / f"{r}_s0" / "row.json").stat().st_mtime_ns for r in ("baseline", "no_lip_term")]
    code, table, err = cli(["ablate", view, "--out", out, "--rows", "baseline,no_lip_term", "--config", TINY_FLAG,
                            "--cluster", "ray"])
    assert code == 0 and table_rows(table) == ["baseline", "no_lip_term"], err
    assert [(out / f"{r}_s0" / "row.json").stat().st_mtime_ns for r in ("baseline", "no_lip_term")] == stamps


def test_a_row_failing_in_its_task_is_reported_and_exits_1(cluster, tmp_path):
    # passes every check before training, but has no frames: fails in the task
    fake = tmp_path / "fake"
    fake.mkdir()
    meta = dict(n_frames=126, fps=25.0, width=64, height=64, sample_rate=16000,
                split=dict(train=[0, 114], test=[114, 126]))
    (fake / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "abl"
    env = os.environ | dict(RAY_ADDRESS=cluster)   # a second driver: the command connects to the running cluster
    r = subprocess.run([sys.executable, "-m", "talkinggs", "study", "ablation", str(fake), "--out", str(out),
                        "--rows", "baseline", "--config", TINY_FLAG, "--cluster", "ray"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    first = (out / "baseline_s0" / "error.txt").read_text().splitlines()[0]
    assert f"(on {os.uname().nodename})" in first and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "1 row(s) failed" in r.stderr and f"  {out / 'baseline_s0'}: {first}" in r.stderr
    assert f"[1/1] {out / 'baseline_s0'} on " in r.stderr and f"failed: {first}" in r.stderr
    assert f"| baseline | 0 | failed: {first} |" in r.stdout


def test_ctrl_c_cancels_the_tasks_which_save_their_checkpoints_and_exits_130(cluster, clip64_once, tmp_path):
    out = tmp_path / "abl"
    long = f"{TINY_FLAG},face_iters=100000,ckpt_every=1"
    env = os.environ | dict(RAY_ADDRESS=cluster)
    p = subprocess.Popen([sys.executable, "-m", "talkinggs", "ablate", str(clip64_once), "--out", str(out),
                          "--rows", "baseline", "--config", long, "--cluster", "ray"],
                         stderr=subprocess.PIPE, text=True,
                         env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # as in a terminal
    ckpt = out / "baseline_s0" / "run" / "face.ckpt.pt"
    try:
        t0 = time.time()
        while not ckpt.is_file() and p.poll() is None and time.time() - t0 < 120:
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        err = p.communicate(timeout=90)[1]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and "interrupted: run the same command again" in err, err[-3000:]
    assert ckpt.is_file() and not (out / "baseline_s0" / "lock.json").exists()
    assert not (out / "baseline_s0" / "error.txt").exists()                    # a stop, not a failure
    t0 = time.time()
    while ray.available_resources().get("CPU", 0) < 2 and time.time() - t0 < 30:   # the task does not run on
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == 2


@pytest.mark.parametrize("flags, needle", [
    (["--cluster", "ray", "--devices", "cpu"], "drop --devices"),
    (["--ship_data"], "it goes with --cluster"),
    (["--cluster", "ray:/gpu-a:10001"], "--cluster takes ray"),
    (["--cluster", "ray", "NO_RAY"], 'pip install -e ".[cluster]"'),
])
def test_cluster_flags_are_checked_before_anything_is_written(flags, needle, clip64_once, tmp_path, cli, monkeypatch):
    if "NO_RAY" in flags:
        monkeypatch.setitem(sys.modules, "ray", None)                # Ray not installed: `import ray` fails
        flags = flags[:-1]
    code, _, err = cli(["ablate", clip64_once, "--out", tmp_path / "abl", "--rows", "baseline", *flags])
    lines = [s for s in err.splitlines() if s.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and not (tmp_path / "abl").exists(), err

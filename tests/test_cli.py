"""The `talkinggs` console script dispatches to sub-commands and parses their options."""
import subprocess, sys


def test_bench_render_cli_prints_numbers():
    out = subprocess.run([sys.executable, "-c", "from talkinggs.cli import main; main()", "bench", "render",
                          "--ns", "300", "--size", "32", "--repeats", "1", "--device", "cpu"],
                         capture_output=True, text=True, check=True).stdout
    row = [l for l in out.splitlines() if l.strip().startswith("torch")][0].split()
    assert row[1] == "300" and float(row[2]) > 0 and float(row[3]) > 0


def test_unknown_command_is_a_clear_error():
    r = subprocess.run([sys.executable, "-c", "from talkinggs.cli import main; main()", "nope"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "unknown command 'nope'" in r.stderr

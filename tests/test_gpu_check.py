"""tools/gpu_check.sh works before a GPU ever runs it: --cpu runs every part at tiny sizes
(the compiled ones excepted), each within its timeout, logs outside the repository, one table."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")


def test_cpu_mode_runs_every_part_and_prints_one_table(tmp_path):
    r = subprocess.run(["bash", SCRIPT, "--cpu", str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    rows = re.findall(r"^\| (\w+) \| (\d+) \| (\d+) \|", r.stdout, re.M)
    assert [name for name, _, _ in rows] == ["cuda_tests", "paper_B8", "paper_B32", "pack_24GB",
                                             "kd_memory", "decode"]
    assert all(rc == "0" for _, rc, _ in rows), rows
    assert (tmp_path / "out" / "paper_B32.txt").read_text().count("| paper |") >= 1


def test_gpu_mode_fits_eight_minutes_and_logs_outside_the_repository(tmp_path):
    text = open(SCRIPT).read()
    start = text.index("else\n    run cuda_tests")
    gpu = text[start:text.index("\nfi\n", start)]
    limits = [int(t) for t in re.findall(r"^\s*run \w+ (\d+) ", gpu, re.M)]
    assert len(limits) == 9 and sum(limits) <= 480, limits
    r = subprocess.run(["bash", SCRIPT, "--cpu", os.path.join(ROOT, "gpu_check_out")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "inside the repository" in r.stderr
    assert not os.path.exists(os.path.join(ROOT, "gpu_check_out"))
    h = subprocess.run(["bash", SCRIPT, "--help"], capture_output=True, text=True, timeout=60)
    assert h.returncode == 0 and "--cpu" in h.stdout

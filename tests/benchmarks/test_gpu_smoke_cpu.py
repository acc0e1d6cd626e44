"""benchmarks/gpu_smoke.py, the script a lent GPU runs once, works end to end: its CPU mode runs
the same setup (corpus, random Grouter, routing cache) and step phase (sync attribution, save,
resume, comparison with an uninterrupted run) on a tiny model."""

import subprocess
import sys

from tests.train_runs import REPO, repo_env


def test_gpu_smoke_script_passes_in_cpu_mode(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/gpu_smoke.py", "--cpu", "--out", str(tmp_path)],
                            cwd=REPO, env=repo_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[-1] == "SMOKE OK"
    assert any(line.startswith("[ok] no host syncs of ours in steps 2-5: ours 0;") for line in lines)
    assert any(line.startswith("[ok] save at 5, resume, 5 more = uninterrupted 10 steps") for line in lines)


def test_gpu_smoke_refuses_without_cuda_in_one_line():
    result = subprocess.run([sys.executable, "benchmarks/gpu_smoke.py"], cwd=REPO, env=repo_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: no CUDA device: run on a GPU machine, or pass --cpu for the script's CPU check"]

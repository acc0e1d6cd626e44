"""The throwaway Slurm cluster really schedules jobs: srun tasks, signals, requeue, clean teardown."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.cluster.slurm_harness import SlurmCluster, missing_requirements, slurm_cluster  # noqa: F401 (fixture)

pytestmark = pytest.mark.cluster


def _write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\nset -u\n" + body)
    path.chmod(0o755)
    return path


def _wait_for_file(path: Path, timeout_s: float, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared\n{cluster.daemon_logs()}")
        time.sleep(0.1)


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_cluster_is_up_with_an_idle_node(slurm_cluster: SlurmCluster) -> None:
    assert slurm_cluster.node_state() == "idle"
    assert "UP" in slurm_cluster.command("scontrol", "ping").stdout
    assert set(slurm_cluster.daemon_pids()) == {"munged", "slurmctld", "slurmd"}
    assert all(_pid_alive(pid) for pid in slurm_cluster.daemon_pids().values())


def test_two_task_job_runs_srun_tasks_with_their_ranks(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = _write_script(
        tmp_path / "two_tasks.sbatch",
        f"srun bash -c 'echo \"$SLURM_PROCID of $SLURM_NTASKS\" > {tmp_path}/rank.$SLURM_PROCID'\n",
    )
    job_id = slurm_cluster.submit(script, "--ntasks=2", f"--output={tmp_path}/job.out")

    assert slurm_cluster.wait(job_id, timeout_s=30) == "COMPLETED"
    assert (tmp_path / "rank.0").read_text().strip() == "0 of 2"
    assert (tmp_path / "rank.1").read_text().strip() == "1 of 2"
    assert slurm_cluster.job_info(job_id)["NumTasks"] == "2"


def test_failing_job_ends_failed_with_its_exit_code(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = _write_script(tmp_path / "fails.sbatch", "exit 3\n")
    job_id = slurm_cluster.submit(script, f"--output={tmp_path}/job.out")

    assert slurm_cluster.wait(job_id, timeout_s=30) == "FAILED"
    assert slurm_cluster.job_info(job_id)["ExitCode"] == "3:0"


def test_signalled_job_requeues_itself_and_runs_again(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    # Mirrors launch/slurm/train.sbatch: on the warning signal the job requeues itself and exits.
    script = _write_script(
        tmp_path / "requeue.sbatch",
        f"""cd {tmp_path}
restart=${{SLURM_RESTART_COUNT:-0}}
echo "start restart=$restart" >> events
if [ "$restart" -ge 1 ]; then echo "finished restart=$restart" >> events; exit 0; fi
trap 'echo "USR1 restart=$restart" >> events; scontrol requeue "$SLURM_JOB_ID"; exit 0' USR1
touch waiting_for_signal
sleep 120 &
wait $!
echo "never signalled" >> events
""",
    )
    job_id = slurm_cluster.submit(script, "--requeue", f"--output={tmp_path}/job.out", "--open-mode=append")
    _wait_for_file(tmp_path / "waiting_for_signal", timeout_s=20, cluster=slurm_cluster)

    slurm_cluster.signal(job_id, "USR1")

    assert slurm_cluster.wait(job_id, timeout_s=40) == "COMPLETED"
    events = (tmp_path / "events").read_text().splitlines()
    assert events == ["start restart=0", "USR1 restart=0", "start restart=1", "finished restart=1"]
    assert slurm_cluster.job_info(job_id)["Restarts"] == "1"


def test_requeue_from_outside_restarts_a_running_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = _write_script(
        tmp_path / "long.sbatch",
        f"""echo "run ${{SLURM_RESTART_COUNT:-0}}" >> {tmp_path}/runs
if [ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ]; then exit 0; fi
sleep 120
""",
    )
    job_id = slurm_cluster.submit(script, "--requeue", f"--output={tmp_path}/job.out")
    slurm_cluster.wait_for_state(job_id, {"RUNNING"}, timeout_s=20)
    _wait_for_file(tmp_path / "runs", timeout_s=20, cluster=slurm_cluster)

    slurm_cluster.requeue(job_id)

    assert slurm_cluster.wait(job_id, timeout_s=40) == "COMPLETED"
    assert (tmp_path / "runs").read_text().splitlines() == ["run 0", "run 1"]


@pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements()))
def test_teardown_ends_every_process_and_removes_the_directory(tmp_path: Path) -> None:
    cluster = SlurmCluster()
    cluster.start()
    try:
        script = _write_script(tmp_path / "sleeper.sbatch", "srun --ntasks=2 sleep 300\n")
        job_id = cluster.submit(script, "--ntasks=2", f"--output={tmp_path}/job.out")
        cluster.wait_for_state(job_id, {"RUNNING"}, timeout_s=20)
        deadline = time.monotonic() + 20
        # The job's tasks (srun's sleeps, slurmstepd) detach from the daemons; wait until they run.
        while len(cluster.stray_pids()) < len(cluster.daemon_pids()) + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        spawned = set(cluster.stray_pids()) | set(cluster.daemon_pids().values())
        root = cluster.root
    finally:
        cluster.stop()

    assert len(spawned) > 3, "the running job should have added processes beyond the three daemons"
    still_alive = [pid for pid in spawned if _pid_alive(pid)]
    assert still_alive == [], f"processes left after teardown: {still_alive}"
    assert root is not None and not root.exists()
    assert not os.path.exists(root)

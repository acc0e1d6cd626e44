"""mg-train launched for real: through launch/slurm/train.sbatch on a throwaway Slurm cluster, and
as a two-"host" torchrun over a veth pair. Every run must reproduce plain single-host torchrun.

All runs are the same tiny job: MICRO_MODEL, parallel=ep2 (2 gloo ranks), STEPS steps. The
baseline is `torchrun --standalone --nproc-per-node 2` on this machine.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.train_runs import MICRO_MODEL, REPO, data_overrides, read_metrics, torchrun, train_losses

from tests.cluster.netns_host import NetnsHost, netns_missing_requirements
from tests.cluster.slurm_harness import SlurmCluster, slurm_cluster  # noqa: F401 (fixture)

pytestmark = pytest.mark.cluster

STEPS = 20
SBATCH_SCRIPT = REPO / "launch" / "slurm" / "train.sbatch"
JOB_TIMEOUT_S = 240


def training_overrides(data: dict, out_dir: Path, *extra: str) -> list[str]:
    """The shared tiny ep2 job (a checkpoint only at the end, or when preempted)."""
    return [*data_overrides(data), *MICRO_MODEL, f"train.steps={STEPS}", "train.warmup_steps=2",
            "train.eval_interval=0", "train.save_interval=0", "parallel=ep2",
            "train.log_interval=1",  # metrics.jsonl gets each step as it ends (the tests wait for one)
            f"train.out_dir={out_dir}", *extra]


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def wait_for_step(out_dir: Path, step: int, timeout_s: float, process_alive=lambda: True) -> None:
    """Block until metrics.jsonl holds a training record with at least `step`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process_alive():
        try:
            if max(train_losses(out_dir), default=0) >= step:
                return
        except (FileNotFoundError, ValueError):  # not written yet, or a line half flushed
            pass
        time.sleep(0.05)
    raise TimeoutError(f"step {step} never showed up in {out_dir}/metrics.jsonl")


def assert_losses_match(run: dict[int, float], baseline: dict[int, float], steps: range) -> None:
    assert sorted(run) == list(steps)
    for step in steps:
        assert run[step] == pytest.approx(baseline[step], rel=1e-6, abs=1e-6), f"step {step}"


@pytest.fixture(scope="module")
def baseline_losses(stdlib_data, tmp_path_factory) -> dict[int, float]:
    """Per-step losses of the job under plain single-host torchrun."""
    out_dir = tmp_path_factory.mktemp("baseline") / "run"
    torchrun(2, training_overrides(stdlib_data, out_dir), timeout=JOB_TIMEOUT_S)
    losses = train_losses(out_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def submit_training(cluster: SlurmCluster, workdir: Path, overrides: list[str]) -> int:
    """sbatch train.sbatch for 2 CPU ranks in one task, on a free rendezvous port."""
    python_bin = Path(sys.executable).parent
    export = (f"--export=ALL,PATH={python_bin}{os.pathsep}{os.environ.get('PATH', '')},"
              f"NPROC_PER_NODE=2,OMP_NUM_THREADS=1,MASTER_PORT={free_tcp_port()}")
    return cluster.submit(SBATCH_SCRIPT, "--cpus-per-task=2", export, f"--output={workdir}/job.out",
                          "--", *overrides, workdir=workdir)


def job_output(workdir: Path) -> str:
    path = workdir / "job.out"
    return path.read_text(errors="replace") if path.exists() else "(no job output)"


def test_slurm_job_trains_like_plain_torchrun(slurm_cluster: SlurmCluster, baseline_losses,
                                              stdlib_data, tmp_path: Path) -> None:
    out_dir = tmp_path / "run"
    job_id = submit_training(slurm_cluster, tmp_path, training_overrides(stdlib_data, out_dir))

    state = slurm_cluster.wait(job_id, timeout_s=JOB_TIMEOUT_S)

    output = job_output(tmp_path)
    assert state == "COMPLETED", output[-5000:]
    assert "EP=2" in output and "world=2" in output
    assert_losses_match(train_losses(out_dir), baseline_losses, range(1, STEPS + 1))


def test_signalled_job_checkpoints_requeues_and_resumes(slurm_cluster: SlurmCluster, baseline_losses,
                                                        stdlib_data, tmp_path: Path) -> None:
    out_dir = tmp_path / "run"
    job_id = submit_training(slurm_cluster, tmp_path, training_overrides(stdlib_data, out_dir))
    wait_for_step(out_dir, 3, timeout_s=JOB_TIMEOUT_S,
                  process_alive=lambda: slurm_cluster.job_state(job_id) in ("PENDING", "RUNNING"))

    slurm_cluster.signal(job_id, "USR1")  # what --signal=B:USR1@120 does before the time limit

    state = slurm_cluster.wait(job_id, timeout_s=JOB_TIMEOUT_S)
    output = job_output(tmp_path)
    assert state == "COMPLETED", output[-5000:]
    assert slurm_cluster.job_info(job_id)["Restarts"] == "1"
    assert "preempted: checkpointed step" in output and "resumed from" in output
    # The first run stopped right after its checkpoint, the second went on from it: every step
    # logged exactly once, with the losses of the uninterrupted run.
    steps = [record["step"] for record in read_metrics(out_dir) if "loss" in record]
    assert steps == list(range(1, STEPS + 1))
    assert_losses_match(train_losses(out_dir), baseline_losses, range(1, STEPS + 1))


@pytest.mark.skipif(netns_missing_requirements() is not None, reason=str(netns_missing_requirements()))
def test_two_hosts_over_a_veth_train_like_one_host(baseline_losses, stdlib_data, tmp_path: Path) -> None:
    first_steps = 5
    out_dir = tmp_path / "run"  # one directory for both hosts: a shared file system
    overrides = training_overrides(stdlib_data, out_dir, f"train.max_steps_this_run={first_steps}")
    with NetnsHost() as host:
        endpoint = f"{host.peer_address}:{free_tcp_port()}"
        processes = {}
        sides = (("root", host.root_interface, host.peer_address),
                 ("netns", host.inner_interface, host.address))
        for name, interface, address in sides:
            # Both "hosts" share one hostname (resolving to 127.0.0.1), from which torchrun would
            # guess whether it hosts the rendezvous store and where the workers meet: say both.
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                       "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=mg-two-hosts",
                       f"--rdzv-conf=is_host={int(name == 'root')}", f"--local-addr={address}",
                       "-m", "megatron_grouter.train", *overrides]
            workdir = tmp_path / name
            workdir.mkdir()
            env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=interface,
                       PYTHONPATH=str(REPO))
            launch = host.popen if name == "netns" else subprocess.Popen
            processes[name] = launch(command, cwd=workdir, env=env, stdout=open(workdir / "log", "w"),
                                     stderr=subprocess.STDOUT)
        try:
            codes = {name: process.wait(timeout=JOB_TIMEOUT_S) for name, process in processes.items()}
        finally:
            for process in processes.values():
                if process.poll() is None:
                    process.kill()
                    process.wait()
        logs = {name: (tmp_path / name / "log").read_text(errors="replace") for name in processes}
        assert codes == {"root": 0, "netns": 0}, "\n".join(text[-3000:] for text in logs.values())
    assert "world=2" in logs["root"] + logs["netns"]
    assert_losses_match(train_losses(out_dir), baseline_losses, range(1, first_steps + 1))

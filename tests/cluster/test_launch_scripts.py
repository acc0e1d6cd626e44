"""launch/torchrun.sh and launch/slurm/train.sbatch, run for real: the refusals (a multi-node
launch without a rendezvous host, a GPU run without GPUs) are one line and exit 2, and the Slurm
step runs inside a container (pyxis flags, or `apptainer exec`) with the job's arguments intact.

The torchrun.sh tests need nothing; the sbatch tests run on the throwaway Slurm cluster of
slurm_harness.py (root and the Slurm packages; skipped otherwise). No container runtime is
installed here: pyxis is checked on the command line the script prints (MG_DRY_RUN=1), apptainer
by a stand-in `apptainer` on PATH that records its arguments and runs the command it was given,
so the job really trains through it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train_runs import MICRO_MODEL, REPO, data_overrides, repo_env, train_losses

from tests.cluster.slurm_harness import SlurmCluster, slurm_cluster  # noqa: F401 (fixture)

TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
SBATCH_SCRIPT = REPO / "launch" / "slurm" / "train.sbatch"
JOB_TIMEOUT_S = 240
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


def launch_env(**overrides: str) -> dict[str, str]:
    """This interpreter's bin first on PATH (torchrun, python), no rendezvous settings inherited."""
    environment = repo_env(**overrides)
    environment["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environment.get("PATH", "")])
    for name in ("MASTER_ADDR", "MASTER_PORT", "NNODES", "MG_DRY_RUN"):
        if name not in overrides:
            environment.pop(name, None)
    return environment


def run_torchrun_sh(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TORCHRUN_SH), *args], cwd=REPO, env=launch_env(**env),
                          capture_output=True, text=True, timeout=120)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


# ----------------------------------------------------------------------------- torchrun.sh
def test_torchrun_sh_refuses_several_nodes_without_master_addr() -> None:
    result = run_torchrun_sh("parallel=ep2", NNODES="2")

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()]  # one line
    assert result.stderr.startswith("error: NNODES=2 needs MASTER_ADDR")


def test_torchrun_sh_keeps_single_node_defaults_and_uses_master_addr_for_several() -> None:
    single = run_torchrun_sh("parallel=ep2", MG_DRY_RUN="1", NPROC_PER_NODE="2")
    several = run_torchrun_sh("parallel=ep2", MG_DRY_RUN="1", NPROC_PER_NODE="2", NNODES="2",
                              MASTER_ADDR="node-a", MASTER_PORT="29611")

    assert single.returncode == 0 and several.returncode == 0, single.stderr + several.stderr
    single_argv, several_argv = shlex.split(single.stdout), shlex.split(several.stdout)
    assert single_argv[:6] == ["torchrun", "--nproc-per-node", "2", "--standalone", "--max-restarts", "0"]
    assert single_argv[-3:] == ["megatron_grouter.train", "train.resume=auto", "parallel=ep2"]
    assert "--rdzv-endpoint" not in single_argv
    endpoint = several_argv[several_argv.index("--rdzv-endpoint") + 1]
    assert endpoint == "node-a:29611" and several_argv[several_argv.index("--nnodes") + 1] == "2"


@needs_no_gpu
def test_torchrun_sh_refuses_a_gpu_run_without_gpus_before_starting_ranks() -> None:
    result = run_torchrun_sh("train=gpu", NPROC_PER_NODE="2")

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == error_lines(result.stderr)  # the one line, nothing else
    assert len(error_lines(result.stderr)) == 1
    assert "train.device=cuda but this process sees no GPU" in result.stderr
    assert "--gpus-per-node" in result.stderr


@needs_no_gpu
@pytest.mark.parametrize("preset", [["parallel=ep8_gpu", "model.num_experts=8"], ["train.device=cuda"]])
def test_mg_train_itself_refuses_a_gpu_run_without_gpus(preset: list[str], tmp_path: Path) -> None:
    """The check every rank makes (a launch that skips the pre-flight: plain torchrun, python -m)."""
    command = [sys.executable, "-m", "megatron_grouter.train", *preset, f"train.out_dir={tmp_path / 'run'}"]
    result = subprocess.run(command, cwd=REPO, env=launch_env(OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=300)

    assert result.returncode == 2, result.stderr[-3000:]
    assert len(error_lines(result.stderr)) == 1 and "Traceback" not in result.stderr
    assert "train.device=cuda but this process sees no GPU" in result.stderr
    assert not (tmp_path / "run").exists()


def test_device_check_lets_cpu_runs_through_and_names_unknown_devices() -> None:
    def check(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "megatron_grouter.training.device_check", *overrides],
                              cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120)

    cpu = check("parallel=ep2", "train.device=auto", "--cfg", "job", "hydra.run.dir=.")
    unknown = check("train.device=gpu")

    assert cpu.returncode == 0 and cpu.stderr == "", cpu.stderr
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == "error: train.device='gpu' is unknown; choose one of auto, cuda"


# ----------------------------------------------------------------------------- train.sbatch
def submit(cluster: SlurmCluster, workdir: Path, overrides: list[str], *options: str, **env: str) -> int:
    """sbatch train.sbatch for 2 CPU ranks in one task; `env` adds to the job's environment."""
    python_bin = Path(sys.executable).parent
    settings = {"PATH": f"{workdir / 'bin'}{os.pathsep}{python_bin}{os.pathsep}{os.environ.get('PATH', '')}",
                "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}
    export = "--export=ALL," + ",".join(f"{name}={value}" for name, value in settings.items())
    return cluster.submit(SBATCH_SCRIPT, "--cpus-per-task=2", export, f"--output={workdir}/job.out",
                          *options, "--", *overrides, workdir=workdir)


def finished_job(cluster: SlurmCluster, job_id: int, workdir: Path) -> tuple[str, str, str]:
    """(final state, exit code "status:signal", the job's output)."""
    state = cluster.wait(job_id, timeout_s=JOB_TIMEOUT_S)
    output = (workdir / "job.out").read_text(errors="replace") if (workdir / "job.out").exists() else ""
    return state, cluster.job_info(job_id)["ExitCode"], output


def dry_run_lines(output: str) -> dict[str, list[str]]:
    """The `name: command line` lines MG_DRY_RUN=1 prints, each split the way bash would."""
    lines = {}
    for line in output.splitlines():
        name, _, rest = line.partition(":")
        if name in ("gpus", "preflight", "step"):
            lines[name] = shlex.split(rest)
    return lines


@needs_no_gpu
def test_sbatch_refuses_a_gpu_preset_without_gpus_in_one_line(slurm_cluster: SlurmCluster,
                                                               tmp_path: Path) -> None:
    out_dir = tmp_path / "run"
    job_id = submit(slurm_cluster, tmp_path, ["train=gpu", f"train.out_dir={out_dir}"])

    state, exit_code, output = finished_job(slurm_cluster, job_id, tmp_path)

    assert (state, exit_code) == ("FAILED", "2:0"), output
    assert output.splitlines() == [output.strip()], output  # the job's whole output: one line
    assert output.startswith("error: train.device=cuda but this process sees no GPU")
    assert "[slurm]" not in output and not out_dir.exists()  # no rank was started


def test_sbatch_runs_the_step_in_a_pyxis_container(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job_id = submit(slurm_cluster, tmp_path, ["parallel=ep2", "train.steps=3"], MG_DRY_RUN="1",
                    MG_CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.01-py3",
                    MG_CONTAINER_MOUNTS=f"{tmp_path}:/workspace:ro")  # (--export splits at commas)

    state, _, output = finished_job(slurm_cluster, job_id, tmp_path)

    assert state == "COMPLETED", output
    lines = dry_run_lines(output)
    flags = ["--container-image=nvcr.io#nvidia/pytorch:25.01-py3",
             f"--container-mounts={tmp_path}:/workspace:ro", f"--container-workdir={tmp_path}"]
    step = lines["step"]
    assert step[0] == "srun" and step[step.index("bash") - 3:step.index("bash")] == flags
    assert step[-3:] == ["_", "parallel=ep2", "train.steps=3"]
    assert "torchrun" in step[step.index("-c") + 1]
    if lines["gpus"] == ["0"]:  # the pre-flight runs in the same image
        preflight = lines["preflight"]
        assert preflight[preflight.index("python3") - 3:preflight.index("python3")] == flags
        assert preflight[-3:] == ["megatron_grouter.training.device_check", "parallel=ep2", "train.steps=3"]


@pytest.mark.parametrize(("visible", "gpus"), [("0", "1"), ("NoDevFiles", "0"), ("", "0")])
def test_sbatch_counts_the_gpus_slurm_gave_the_job(slurm_cluster: SlurmCluster, tmp_path: Path,
                                                   visible: str, gpus: str) -> None:
    """CUDA_VISIBLE_DEVICES (what Slurm sets for --gpus-per-node) decides; only a job that sees no
    GPU runs the pre-flight."""
    job_id = submit(slurm_cluster, tmp_path, ["parallel=ep2"], MG_DRY_RUN="1", CUDA_VISIBLE_DEVICES=visible)

    state, _, output = finished_job(slurm_cluster, job_id, tmp_path)

    assert state == "COMPLETED", output
    lines = dry_run_lines(output)
    assert lines["gpus"] == [gpus]
    assert ("preflight" in lines) == (gpus == "0")


def test_sbatch_refuses_two_container_runtimes_at_once(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job_id = submit(slurm_cluster, tmp_path, ["parallel=ep2"], MG_CONTAINER_IMAGE="a.sqsh",
                    MG_APPTAINER_IMAGE="b.sif")

    state, exit_code, output = finished_job(slurm_cluster, job_id, tmp_path)

    assert (state, exit_code) == ("FAILED", "2:0")
    assert output.strip() == "error: MG_CONTAINER_IMAGE (pyxis) and MG_APPTAINER_IMAGE are both set; keep one"


FAKE_APPTAINER = """#!{python}
# Stand-in for apptainer: records its arguments (one JSON list a line), then runs the command that
# follows the image, as `apptainer exec` would inside it.
import json, os, sys

arguments = sys.argv[1:]
with open(os.environ["APPTAINER_LOG"], "a") as log:
    log.write(json.dumps(arguments) + "\\n")
if arguments[0] != "exec":
    sys.exit(64)
index = 1
while arguments[index].startswith("-"):
    index += 2 if arguments[index] in ("--bind", "--pwd") else 1
os.execvp(arguments[index + 1], arguments[index + 1:])
"""


def test_sbatch_trains_through_apptainer_exec(slurm_cluster: SlurmCluster, stdlib_data, tmp_path: Path) -> None:
    steps = 3
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apptainer").write_text(FAKE_APPTAINER.format(python=sys.executable))
    (bin_dir / "apptainer").chmod(0o755)
    out_dir = tmp_path / "run"
    overrides = [*data_overrides(stdlib_data), *MICRO_MODEL, f"train.steps={steps}", "train.warmup_steps=1",
                 "train.eval_interval=0", "parallel=ep2", f"train.out_dir={out_dir}"]
    job_id = submit(slurm_cluster, tmp_path, overrides, MG_APPTAINER_IMAGE="/images/mg.sif",
                    APPTAINER_LOG=str(tmp_path / "apptainer.log"), MASTER_PORT=str(free_port()))

    state, _, output = finished_job(slurm_cluster, job_id, tmp_path)

    assert state == "COMPLETED", output[-5000:]
    assert sorted(train_losses(out_dir)) == list(range(1, steps + 1))
    calls = [json.loads(line) for line in (tmp_path / "apptainer.log").read_text().splitlines()]
    image_at = {index: call.index("/images/mg.sif") for index, call in enumerate(calls)}
    for index, call in enumerate(calls):
        assert call[:image_at[index]] == ["exec", "--nv", "--bind", str(tmp_path), "--pwd", str(tmp_path)]
    commands = [call[image_at[index] + 1:] for index, call in enumerate(calls)]
    step = [command for command in commands if command[0] == "bash"]
    assert len(step) == 1 and "torchrun" in step[0][2] and step[0][3:] == ["_", *overrides]
    preflight = [command for command in commands if command[0] == "python3"]
    assert preflight == [["python3", "-m", "megatron_grouter.training.device_check", *overrides]]


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]

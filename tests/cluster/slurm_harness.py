"""A throwaway, real one-node Slurm cluster for tests.

`SlurmCluster` starts its own munged, slurmctld and slurmd (Debian's Slurm 22.05 packages, see
.ci/install_slurm.sh) with every file -- munge key and socket, slurm.conf, state, spool, logs,
pid files -- under one temporary directory, on free TCP ports, so it touches nothing of the
machine's own Slurm or munge setup and several clusters can run side by side. Client commands
reach it through `env()` (SLURM_CONF points at our slurm.conf).

The daemons run in the foreground as our child processes, so their pids are known exactly and
teardown ends them by pid. Processes the cluster spawned on its own (slurmstepd and the job's
tasks, which daemonize away from slurmd) carry a marker variable in their environment
(`HARNESS_MARKER_VAR=<cluster dir>`); teardown ends those by pid too, so nothing outlives it.

Needs root (slurmd launches jobs as their users; munged must run as the munge user) and the
binaries; `missing_requirements()` says what is missing and `slurm_cluster` (a pytest fixture)
skips with that reason.

    with SlurmCluster() as cluster:
        job_id = cluster.submit(script, "--ntasks=2")
        assert cluster.wait(job_id, timeout_s=30) == "COMPLETED"
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal as signal_module
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HARNESS_MARKER_VAR = "MEGATRON_GROUTER_SLURM_HARNESS"
REQUIRED_BINARIES = (
    "munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel",
)
FINAL_JOB_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
    "PREEMPTED",
})
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
# Slurm holds a requeued job back for `cred_expire` seconds (default 120); tests want it short.
_REQUEUE_DELAY_S = 5


def _find_binary(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN_DIRS))


def missing_requirements() -> str | None:
    """Why a SlurmCluster cannot start here (None when it can): not root, or binaries/users missing."""
    if os.geteuid() != 0:
        return "the Slurm test cluster needs root (slurmd launches jobs, munged runs as the munge user)"
    missing = [name for name in REQUIRED_BINARIES if _find_binary(name) is None]
    if missing:
        return f"Slurm/munge binaries missing ({', '.join(missing)}); run .ci/install_slurm.sh"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user; reinstall the munge package (.ci/install_slurm.sh)"
    return None


def _free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _atomic_write(path: Path, content: str | bytes, mode: int = 0o644) -> None:
    tmp_path = path.with_name(path.name + ".tmp")
    tmp_path.write_bytes(content.encode() if isinstance(content, str) else content)
    os.chmod(tmp_path, mode)
    os.replace(tmp_path, path)


def _detected_node_hardware() -> tuple[int, int]:
    """(CPUs, RealMemory in MB) as slurmd itself sees them (`slurmd -C`)."""
    output = subprocess.run(
        [_find_binary("slurmd") or "slurmd", "-C"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    fields = dict(item.split("=", 1) for item in output.split() if "=" in item)
    return int(fields["CPUs"]), int(fields["RealMemory"])


def _pids_with_environment_entry(entry: bytes) -> list[int]:
    """Pids of live processes whose environment holds `entry` (b"NAME=value")."""
    found = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit() or int(proc_dir.name) == os.getpid():
            continue
        try:
            environment = (proc_dir / "environ").read_bytes()
        except OSError:
            continue
        if entry in environment.split(b"\0"):
            found.append(int(proc_dir.name))
    return found


def _pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            state = stat_file.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


class SlurmCluster:
    """A real one-node Slurm cluster under a temp dir; use as a context manager (or start/stop).

    cpus / real_memory_mb: what the node advertises; default what slurmd detects. More CPUs than
    the machine has is allowed (SlurmdParameters=config_overrides), so multi-task jobs fit on
    small CI machines. keep_dir: leave the directory (logs, job output) after stop for debugging.
    """

    def __init__(
        self,
        cpus: int | None = None,
        real_memory_mb: int | None = None,
        start_timeout_s: float = 30.0,
        keep_dir: bool = False,
    ):
        reason = missing_requirements()
        if reason is not None:
            raise RuntimeError(reason)
        if cpus is not None and cpus < 1:
            raise ValueError(f"cpus must be >= 1, got {cpus}")
        self._requested_cpus = cpus
        self._requested_memory_mb = real_memory_mb
        self.start_timeout_s = start_timeout_s
        self.keep_dir = keep_dir
        self.node_name = socket.gethostname().split(".")[0]
        self.root: Path | None = None
        self._daemons: dict[str, subprocess.Popen] = {}

    # ----- paths -----
    @property
    def conf_path(self) -> Path:
        """slurm.conf of this cluster (what SLURM_CONF points at)."""
        return self._dir / "slurm.conf"

    @property
    def jobs_dir(self) -> Path:
        """Default working directory of submitted jobs (their slurm-<id>.out land here)."""
        return self._dir / "jobs"

    @property
    def log_dir(self) -> Path:
        return self._dir / "log"

    @property
    def munge_socket(self) -> Path:
        return self._dir / "munge" / "run" / "munge.socket"

    @property
    def _dir(self) -> Path:
        if self.root is None:
            raise RuntimeError("SlurmCluster is not started; use it as a context manager or call start()")
        return self.root

    # ----- lifecycle -----
    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.root is not None:
            print(self.daemon_logs())
        self.stop()

    def start(self) -> None:
        """Start munged, slurmctld and slurmd; return once the node is idle (raises on timeout)."""
        if self.root is not None:
            raise RuntimeError("SlurmCluster already started")
        self.root = Path(tempfile.mkdtemp(prefix="mg-slurm-"))
        os.chmod(self.root, 0o755)  # the munge user must traverse to its socket
        try:
            for sub in ("state", "spool", "log", "jobs"):
                (self.root / sub).mkdir()
            self._start_munged()
            self._write_config()
            self._start_daemon("slurmctld", [_find_binary("slurmctld"), "-D", "-f", str(self.conf_path)])
            self._wait_until(self._controller_up, "slurmctld answering scontrol ping")
            self._start_daemon("slurmd", [_find_binary("slurmd"), "-D", "-f", str(self.conf_path)])
            self._wait_until(lambda: self.node_state() == "idle", f"node {self.node_name} idle in sinfo")
        except BaseException:
            print(self.daemon_logs())
            self.stop()
            raise

    def stop(self) -> None:
        """Cancel jobs, end the daemons and every process they spawned (by pid), remove the dir."""
        if self.root is None:
            return
        try:
            if "slurmctld" in self._daemons and self._daemons["slurmctld"].poll() is None:
                self._cancel_all_jobs()
            for name in ("slurmd", "slurmctld", "munged"):
                if name in self._daemons:
                    self._end_process(self._daemons[name])
            self._end_pids(self.stray_pids())
        finally:
            self._daemons.clear()
            if not self.keep_dir:
                shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def daemon_pids(self) -> dict[str, int]:
        """{daemon name: pid} of munged, slurmctld, slurmd as started."""
        return {name: process.pid for name, process in self._daemons.items()}

    def stray_pids(self) -> list[int]:
        """Pids of live processes this cluster spawned (marker in their environment), daemons included."""
        if self.root is None:
            return []
        return _pids_with_environment_entry(f"{HARNESS_MARKER_VAR}={self.root}".encode())

    # ----- client side -----
    def env(self) -> dict[str, str]:
        """Environment for Slurm client commands (sbatch, srun, scontrol...) aimed at this cluster."""
        environment = dict(os.environ)
        environment["SLURM_CONF"] = str(self.conf_path)
        environment[HARNESS_MARKER_VAR] = str(self._dir)
        environment["PATH"] = os.pathsep.join([environment.get("PATH", ""), *_SBIN_DIRS])
        # Settings leaking in from an enclosing Slurm job would retarget our clients.
        for name in list(environment):
            if name.startswith("SLURM_") and name != "SLURM_CONF" or name.startswith(("SBATCH_", "SALLOC_")):
                del environment[name]
        return environment

    def command(self, *args: str, timeout_s: float = 30.0, check: bool = True) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster; raise with its stderr when it fails."""
        result = subprocess.run(list(args), env=self.env(), capture_output=True, text=True, timeout=timeout_s)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def submit(
        self, script_path: str | os.PathLike, *sbatch_args: str, workdir: str | os.PathLike | None = None
    ) -> int:
        """sbatch `script_path` with extra `sbatch_args` (options first, then script arguments after
        `--`); the job runs in `workdir` (default jobs_dir). Returns the job id."""
        options, script_args = _split_at_double_dash(sbatch_args)
        directory = Path(workdir) if workdir is not None else self.jobs_dir
        result = self.command(
            "sbatch", "--parsable", f"--chdir={directory}", *options, str(script_path), *script_args
        )
        return int(result.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` fields of `job_id` (jobs stay listed for a day: MinJobAge)."""
        output = self.command("scontrol", "show", "job", "--oneliner", str(job_id)).stdout
        return _parse_scontrol_record(output)

    def job_state(self, job_id: int) -> str:
        return self.job_info(job_id)["JobState"]

    def wait(self, job_id: int, timeout_s: float = 60.0, poll_s: float = 0.25) -> str:
        """Block until `job_id` reaches a final state and return it (e.g. "COMPLETED").

        A requeued job is not final: it goes back to PENDING and runs again, so this waits through
        requeues. Raises TimeoutError (with the daemon logs) after `timeout_s`."""
        return self.wait_for_state(job_id, FINAL_JOB_STATES, timeout_s, poll_s)

    def wait_for_state(
        self, job_id: int, states: frozenset[str] | set[str], timeout_s: float = 60.0, poll_s: float = 0.25
    ) -> str:
        """Block until the job's state is one of `states` (e.g. {"RUNNING"}); return it."""
        deadline = time.monotonic() + timeout_s
        state = "unknown"
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(poll_s)
        raise TimeoutError(
            f"job {job_id} still {state} after {timeout_s:.0f}s, wanted one of {sorted(states)}\n"
            f"{self.job_info(job_id)}\n{self.daemon_logs()}"
        )

    def requeue(self, job_id: int) -> None:
        """`scontrol requeue`: end the running job and put it back in the queue (restart count +1)."""
        self.command("scontrol", "requeue", str(job_id))

    def signal(self, job_id: int, sig: int | str, batch_only: bool = True) -> None:
        """Send `sig` (number or name like "USR1") to the job: only its batch shell when
        `batch_only` (what `#SBATCH --signal=B:...` does), else to all its steps."""
        name = sig if isinstance(sig, str) else signal_module.Signals(sig).name
        name = name.removeprefix("SIG")
        self.command("scancel", f"--signal={name}", *(["--batch"] if batch_only else []), str(job_id))

    def cancel(self, job_id: int) -> None:
        self.command("scancel", str(job_id))

    def node_state(self) -> str:
        """sinfo's state of our node ("idle", "alloc", "down*", ...)."""
        result = self.command("sinfo", "--noheader", "--Node", "--format=%T", check=False)
        return result.stdout.strip() if result.returncode == 0 else ""

    def daemon_logs(self, tail_lines: int = 40) -> str:
        """The last lines of every daemon log, for failure messages.

        A daemon's console output repeats its log file, so it is shown only where the log file is
        empty (a daemon that died before opening it)."""
        if self.root is None:
            return "(cluster not running)"
        sections = []
        for name in ("munged", "slurmctld", "slurmd"):
            log_path = self.log_dir / f"{name}.log"
            if not log_path.exists() or log_path.stat().st_size == 0:
                log_path = self.log_dir / f"{name}.console"
            if log_path.exists():
                lines = log_path.read_text(errors="replace").splitlines()[-tail_lines:]
                sections.append(f"===== {log_path.name} =====\n" + "\n".join(lines))
        return "\n".join(sections)

    # ----- internals -----
    def _daemon_env(self) -> dict[str, str]:
        environment = self.env()
        environment["HOME"] = str(self._dir)
        return environment

    def _start_munged(self) -> None:
        """munged with its own key, socket, pid, seed and log, running as the munge user.

        munged refuses group/world-writable dirs for its key/log and needs a traversable socket dir."""
        munge_user = pwd.getpwnam("munge")
        munge_dir = self._dir / "munge"
        layout = {"etc": 0o700, "run": 0o755, "lib": 0o700}
        munge_dir.mkdir(mode=0o755)
        for sub, mode in layout.items():
            (munge_dir / sub).mkdir()
            os.chmod(munge_dir / sub, mode)
        key_path = munge_dir / "etc" / "munge.key"
        _atomic_write(key_path, os.urandom(1024), 0o400)
        for path in [munge_dir, *(munge_dir / sub for sub in layout), key_path]:
            os.chown(path, munge_user.pw_uid, munge_user.pw_gid)
        log_path = self.log_dir / "munged.log"
        log_path.touch(mode=0o600)
        os.chown(log_path, munge_user.pw_uid, munge_user.pw_gid)
        os.chmod(self.log_dir, 0o755)
        self._start_daemon(
            "munged",
            [
                _find_binary("munged"),
                "--foreground",
                f"--socket={self.munge_socket}",
                f"--key-file={key_path}",
                f"--pid-file={munge_dir / 'run' / 'munged.pid'}",
                f"--seed-file={munge_dir / 'lib' / 'munged.seed'}",
                f"--log-file={log_path}",
            ],
            user=munge_user.pw_uid,
            group=munge_user.pw_gid,
        )
        self._wait_until(self.munge_socket.exists, "munged socket")

    def _write_config(self) -> None:
        detected_cpus, detected_memory_mb = _detected_node_hardware()
        cpus = self._requested_cpus or detected_cpus
        memory_mb = self._requested_memory_mb or max(1, detected_memory_mb * 9 // 10)
        root = self._dir
        settings = {
            "ClusterName": "mgtest",
            "SlurmctldHost": f"{self.node_name}(127.0.0.1)",
            "SlurmctldPort": _free_tcp_port(),
            "SlurmdPort": _free_tcp_port(),
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket},cred_expire={_REQUEUE_DELAY_S}",
            "StateSaveLocation": root / "state",
            "SlurmdSpoolDir": root / "spool",
            "SlurmctldPidFile": root / "log" / "slurmctld.pid",
            "SlurmdPidFile": root / "log" / "slurmd.pid",
            "SlurmctldLogFile": root / "log" / "slurmctld.log",
            "SlurmdLogFile": root / "log" / "slurmd.log",
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            "PlugStackConfig": root / "plugstack.conf",
            "MailProg": "/bin/true",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_CPU",
            "SlurmdParameters": "config_overrides",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "MpiDefault": "none",
            "ReturnToService": 2,
            "JobRequeue": 1,
            "MinJobAge": 86400,
            "KillWait": 5,
            "SchedulerType": "sched/backfill",
            # Re-schedule every second so a requeued job restarts right after its hold-back.
            "SchedulerParameters": "sched_interval=1,bf_interval=1",
        }
        lines = [f"{key}={value}" for key, value in settings.items()]
        lines.append(
            f"NodeName={self.node_name} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN"
        )
        lines.append(f"PartitionName=debug Nodes={self.node_name} Default=YES MaxTime=INFINITE State=UP")
        _atomic_write(root / "plugstack.conf", "")
        _atomic_write(self.conf_path, "\n".join(lines) + "\n")

    def _start_daemon(self, name: str, argv: list, **popen_kwargs) -> None:
        console_path = self.log_dir / f"{name}.console"
        with open(console_path, "ab") as console:
            self._daemons[name] = subprocess.Popen(
                [str(arg) for arg in argv],
                env=self._daemon_env(),
                cwd=self._dir,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **popen_kwargs,
            )

    def _controller_up(self) -> bool:
        result = self.command("scontrol", "ping", check=False, timeout_s=10)
        return result.returncode == 0 and "UP" in result.stdout

    def _wait_until(self, condition, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            for name, process in self._daemons.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode} while waiting for {what}")
            if condition():
                return
            time.sleep(0.1)
        raise TimeoutError(f"timed out after {self.start_timeout_s:.0f}s waiting for {what}")

    def _cancel_all_jobs(self) -> None:
        active = self.command("squeue", "--noheader", "--format=%i", check=False).stdout.split()
        if not active:
            return
        self.command("scancel", *active, check=False)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if not self.command("squeue", "--noheader", "--format=%i", check=False).stdout.split():
                return
            time.sleep(0.2)

    @staticmethod
    def _end_process(process: subprocess.Popen, grace_s: float = 10.0) -> None:
        if process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=grace_s)

    @staticmethod
    def _end_pids(pids: list[int], grace_s: float = 5.0) -> None:
        """SIGTERM all of `pids`, then SIGKILL those still alive after `grace_s` (slurmstepd
        ignores SIGTERM while its tasks run)."""
        for pid in pids:
            try:
                os.kill(pid, signal_module.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_pid_alive(pid) for pid in pids):
            time.sleep(0.05)
        for pid in pids:
            if _pid_alive(pid):
                try:
                    os.kill(pid, signal_module.SIGKILL)
                except ProcessLookupError:
                    pass


def _split_at_double_dash(args: tuple[str, ...]) -> tuple[list[str], list[str]]:
    if "--" in args:
        index = args.index("--")
        return list(args[:index]), list(args[index + 1 :])
    return list(args), []


def _parse_scontrol_record(text: str) -> dict[str, str]:
    """Key=Value fields of one `scontrol show --oneliner` record (values have no spaces, except
    a few trailing fields like Command, which we do not need to split exactly)."""
    fields: dict[str, str] = {}
    for item in text.split():
        if "=" in item:
            key, value = item.split("=", 1)
            fields.setdefault(key, value)
    return fields


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running SlurmCluster shared by one test module; skips when the machine cannot host it.

    Import it into a test module (`from .slurm_harness import slurm_cluster`). The daemon logs are
    printed at teardown, so pytest shows them for failing tests."""
    reason = missing_requirements()
    if reason is not None:
        pytest.skip(reason)
    with SlurmCluster() as cluster:
        try:
            yield cluster
        finally:
            print(cluster.daemon_logs())

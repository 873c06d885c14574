"""A one-node SLURM cluster on localhost for the cluster tests (tests/integration/test_clusters.py).

``local_slurm(tmp)`` writes a minimal ``slurm.conf`` into ``tmp`` (proctrack/linuxproc, task/none,
no cgroups, no accounting database: finished jobs go to a ``jobcomp/filetxt`` file), starts its own
``munged``, ``slurmctld`` and ``slurmd`` in the foreground on free ports, waits until the node is
idle and yields a ``Slurm`` whose ``env`` points the client commands (``sbatch``, ``squeue``,
``scontrol``, ``scancel``) at it. Everything is stopped at the end. Needs the Debian packages
``slurm-wlm`` and ``munge`` (``.ci/run`` installs them) and root (slurmd runs jobs as their user).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from trainer.ports import free_port

TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")
_SBIN = ("/usr/sbin", "/usr/bin", "/sbin")


def missing_tools() -> list[str]:
    """The SLURM/munge programs this machine lacks (root is needed too: listed as `root`)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    missing = [t for t in TOOLS if not shutil.which(t, path=path)]
    if os.geteuid() != 0:
        missing.append("root")
    return missing


@dataclass
class Slurm:
    """A running local cluster: `env` for client commands, `jobcomp` the finished-jobs file."""

    dir: str
    env: dict[str, str]
    jobcomp: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *cmd: str, timeout: float = 60) -> str:
        """A client command (`scontrol show job 3`...) to the end; its stdout (raises on error)."""
        done = subprocess.run(
            list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as {field: value} (JobState, ExitCode, Restarts...)."""
        text = self.run("scontrol", "show", "job", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def completions(self, job_id: str) -> list[dict[str, str]]:
        """The jobcomp records of `job_id` (one per time the job ended, requeues included)."""
        if not os.path.isfile(self.jobcomp):
            return []
        with open(self.jobcomp) as f:
            rows = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in f]
        return [r for r in rows if r.get("JobId") == job_id]

    def wait_state(self, job_id: str, states: tuple[str, ...], timeout: float = 300) -> str:
        """Polls until the job's state is one of `states`; returns it."""
        end, state = time.monotonic() + timeout, ""
        while time.monotonic() < end:
            with contextlib.suppress(RuntimeError):
                state = self.job(job_id).get("JobState", "")
            if state in states:
                return state
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {state or 'unknown'} after {timeout}s")


def _conf(d: str, host: str, cpus: int, ports: tuple[int, int], munge_sock: str) -> str:
    return f"""ClusterName=arcscale_test
SlurmctldHost={host}
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_sock},cred_expire=5
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={d}/jobcomp.txt
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=30
MpiDefault=none
SlurmdParameters=config_overrides
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _wait(pred, what: str, logs: list[str], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.3)
    tails = "\n".join(f"--- {p}\n{_tail(p)}" for p in logs)
    raise RuntimeError(f"local SLURM: {what} not reached in {timeout}s\n{tails}")


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-1500:]
    except OSError:
        return "(no file)"


@contextlib.contextmanager
def local_slurm(tmp: str, cpus: int = 4) -> Iterator[Slurm]:
    """Starts munged + slurmctld + slurmd for one node named after this host; yields a `Slurm`.

    Args:
        tmp: a fresh folder for the config, state, spool, logs and the jobcomp file.
        cpus: CPUs the node declares (more than the machine has is allowed: config_overrides).
    """
    d = os.path.abspath(tmp)
    for sub in ("state", "spool", "munge"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    os.chmod(os.path.join(d, "munge"), 0o700)
    host = socket.gethostname().split(".")[0]
    sock = os.path.join(d, "munge", "munge.socket")
    conf = os.path.join(d, "slurm.conf")
    with open(conf, "w") as f:
        f.write(_conf(d, host, cpus, (free_port(), free_port()), sock))
    path = os.pathsep.join([*_SBIN, os.environ.get("PATH", "")])
    env = {**os.environ, "SLURM_CONF": conf, "PATH": path}
    cluster = Slurm(d, env, os.path.join(d, "jobcomp.txt"))
    logs = [f"{d}/munged.log", f"{d}/slurmctld.log", f"{d}/slurmd.log"]
    daemons = [
        ["munged", "-F", "-f", f"--socket={sock}", "--key-file=/etc/munge/munge.key",
         f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/munged.log",
         f"--seed-file={d}/munge/munged.seed"],
        ["slurmctld", "-D", "-i", "-f", conf],
        ["slurmd", "-D", "-f", conf, "-N", host],
    ]  # fmt: skip
    try:
        for i, cmd in enumerate(daemons):
            out = open(os.path.join(d, f"daemon{i}.out"), "w")  # noqa: SIM115 - closed with the proc
            cluster.procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=out))
            if i == 0:
                _wait(lambda: os.path.exists(sock), "munged socket", logs)
        _wait(lambda: _node_idle(cluster), "node idle", logs)
        yield cluster
    finally:
        for proc in reversed(cluster.procs):
            proc.terminate()
        for proc in reversed(cluster.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _node_idle(cluster: Slurm) -> bool:
    try:
        out = cluster.run("sinfo", "-h", "-o", "%T", timeout=10)
    except (RuntimeError, subprocess.TimeoutExpired):
        return False
    return out.strip().startswith("idle")

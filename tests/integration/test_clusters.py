"""Clusters (docs/clusters.md): a signal stops every rank at one step with a checkpoint and loses
no step; the SLURM batch script trains through `accelerate launch` and through `srun` (ranks
from SLURM's variables), and a `scancel --signal=USR1` + requeue cycle completes the run.

The SLURM test runs its own munged/slurmctld/slurmd on localhost (tests/helpers/slurm.py). It
needs the Debian packages slurm-wlm and munge and root (`.ci/run` installs them): skipped without
them, except under CI=true, where that is a failure.
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.faults import CONFIG, NUM
from tests.helpers.launch import (
    REPO,
    TINY,
    Launch,
    accelerate_cmd,
    free_port,
    launch_env,
    losses,
    tiny_overrides,
)
from tests.helpers.slurm import local_slurm, missing_tools

ZERO2 = "accelerate_configs/cpu_2proc_zero2.yaml"
STOP_RE = re.compile(r"^\[arcscale\] (SIG\w+): stopped after step (\d+), checkpoint (\S+) ", re.M)


def _poll(pred, timeout=300, every=0.1):
    end = time.time() + timeout
    while time.time() < end:
        if hit := pred():
            return hit
        time.sleep(every)
    raise AssertionError("condition not reached in time")


def _latest(out):
    return (out / "checkpoints" / "latest").read_text().strip()


def _assert_continues(curve, ref):
    """Every step of `ref` trained exactly once in `curve` with the same loss (console, 4 d.p.)."""
    assert sorted(curve) == sorted(ref), (sorted(curve), sorted(ref))
    for step, loss in ref.items():
        assert abs(curve[step] - loss) <= 2e-4, (step, curve[step], loss)


# --- preemption through accelerate launch ------------------------------------------------------


def test_sigint_stops_all_ranks_at_one_step_and_resume_loses_none(lfw16, tmp_path):
    """Ctrl-C (SIGINT to the launcher's process group) during a 2-process run with
    `preemption.sync_every=2`: both ranks stop after the same even step s, `latest` names the
    complete `step_s`, rank 0 logs one stop line and no rank prints a traceback (the only one is
    torchrun's agent re-raising the signal); `checkpoint.resume=true` then trains s+1..8 and the
    loss at every step equals the uninterrupted run's."""
    steps = 8

    def ov(name, *more):
        base = ["engine.precision=fp32", "preemption.sync_every=2", *more]
        return tiny_overrides(tmp_path / name, lfw16, NUM, steps, *base)

    def launch(name, overrides):
        return Launch(accelerate_cmd(CONFIG, overrides, ZERO2), tmp_path, name)

    ref = launch("ref", ov("ref"))
    ref_curve = losses(ref.ok())
    assert sorted(ref_curve) == list(range(1, steps + 1))

    run = launch("int", ov("run"))
    _poll(lambda: "Step 2/" in run.stdout or run.proc.poll() is not None)
    os.killpg(run.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
    run.wait(timeout=300)
    stdout, stderr = run.stdout, run.stderr
    stops = STOP_RE.findall(stdout)
    assert len(stops) == 1, stdout[-3000:]
    name, at, path = stops[0][0], int(stops[0][1]), stops[0][2]
    assert name == "SIGINT" and at % 2 == 0 and 2 <= at < steps, stops
    assert "exit 130" in stdout and path.endswith(f"step_{at}")
    assert _latest(tmp_path / "run") == f"step_{at}"
    assert os.path.isfile(os.path.join(path, "meta.json"))
    assert sorted(losses(stdout)) == list(range(1, at + 1))
    assert "KeyboardInterrupt" not in stderr
    assert stderr.count("Traceback") <= 1, stderr[-3000:]
    if "Traceback" in stderr:  # torchrun's agent re-raising the signal, not a rank
        assert re.search(r"SignalException: Process \d+ got signal: 2\s*$", stderr), stderr[-2000:]

    resumed = launch("resume", ov("run", "checkpoint.resume=true")).ok()
    assert f"resumed from {path} at step {at}" in resumed
    curve = {**{s: x for s, x in losses(stdout).items()}, **losses(resumed)}
    _assert_continues(curve, ref_curve)


# --- SLURM -------------------------------------------------------------------------------------


@pytest.fixture
def slurm(tmp_path):
    missing = missing_tools()
    if missing:
        msg = f"SLURM test needs {', '.join(missing)} (apt-get install slurm-wlm munge; root)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    with local_slurm(str(tmp_path / "slurm")) as cluster:
        yield cluster


SBATCH = os.path.join(REPO, "tools", "slurm", "arcscale.sbatch")
SYNTH = os.path.join(REPO, "configs", "synthetic_tiny.yaml")


def _sbatch(slurm, tmp_path, name, overrides, env=None):
    """Submits tools/slurm/arcscale.sbatch for 2 CPU tasks on the one node; (job id, log path)."""
    log = tmp_path / f"{name}-%j.out"
    cmd = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"]
    cmd += ["--gpus-per-node=0", f"--output={log}", f"--job-name={name}", SBATCH, SYNTH]
    env = {
        **launch_env(),
        **slurm.env,
        "ARCSCALE_PYTHON": os.path.join(REPO, ".venv", "bin", "python"),
        **(env or {}),
    }
    done = subprocess.run(
        [*cmd, *overrides], env=env, capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().split(";")[0]
    return job, tmp_path / f"{name}-{job}.out"


def test_slurm_batch_script_trains_and_survives_usr1_with_requeue(slurm, tmp_path):
    """tools/slurm/arcscale.sbatch on a local one-node SLURM, 2 CPU tasks (gloo):
    - ARCSCALE_LAUNCHER=accelerate: one `accelerate launch` of 2 ranks trains 8 steps,
      checkpoints, the job ends COMPLETED with exit 0 (jobcomp record) and the log shows it;
    - the default (srun starts the ranks; RANK/WORLD_SIZE from SLURM's variables) on the same
      config gets `scancel --signal=USR1` after step 2: the ranks stop at one step, save it,
      rank 0 requeues the job, the restarted job (restart 1) resumes there and finishes; every
      step 1..8 trained once with the losses of the accelerate job (same ranks, same data)."""
    ov = [*TINY, "data.num_classes=101", "data.num_image=2048", "schedule.max_steps=8"]
    ov += ["engine.precision=fp32", "preemption.sync_every=2", "checkpoint.every=4"]

    accel_env = {"ARCSCALE_LAUNCHER": "accelerate", "ARCSCALE_ACCEL_CONFIG": ZERO2}
    job_a, log_a = _sbatch(slurm, tmp_path, "accel", [*ov, f"output={tmp_path / 'a'}"], accel_env)
    assert slurm.wait_state(job_a, ("COMPLETED", "FAILED", "CANCELLED")) == "COMPLETED", (
        log_a.read_text()[-4000:] if log_a.exists() else "no log"
    )
    text_a = log_a.read_text()
    assert "world size 2" in text_a and "trainer exit 0" in text_a
    ends = slurm.completions(job_a)
    assert ends and ends[-1]["JobState"] == "COMPLETED" and ends[-1]["ExitCode"] == "0:0", ends
    assert os.path.isfile(tmp_path / "a" / "backbone.pt")
    ref = losses(text_a)
    assert sorted(ref) == list(range(1, 9))

    job_b, log_b = _sbatch(slurm, tmp_path, "srun", [*ov, f"output={tmp_path / 'b'}"])
    _poll(lambda: log_b.exists() and "Step 2/" in log_b.read_text())
    slurm.run("scancel", "--signal=USR1", job_b)
    _poll(lambda: "restart 1" in log_b.read_text())
    assert slurm.wait_state(job_b, ("COMPLETED", "FAILED", "CANCELLED")) == "COMPLETED"
    text_b = log_b.read_text()
    stops = STOP_RE.findall(text_b)
    assert len(stops) == 1 and stops[0][0] == "SIGUSR1", text_b[-4000:]
    at = int(stops[0][1])
    assert (
        f"requeueing SLURM job {job_b}" in text_b and "SLURM tasks as ranks: world size 2" in text_b
    )
    first, _, second = text_b.partition("restart 1")
    assert f"resumed from {stops[0][2]} at step {at}" in second
    assert sorted(losses(first)) == list(range(1, at + 1))
    assert sorted(losses(second)) == list(range(at + 1, 9))
    _assert_continues({**losses(first), **losses(second)}, ref)
    assert slurm.job(job_b).get("Restarts") == "1"
    assert os.path.isfile(tmp_path / "b" / "backbone.pt")


# --- elastic -----------------------------------------------------------------------------------


def _agent(tmp_path, name, port, host, overrides):
    """One torchrun elastic agent (1..2 nodes of 1 rank, c10d rendezvous on 127.0.0.1:port);
    `host`: this agent hosts the rendezvous store."""
    conf = f"is_host={str(host).lower()},last_call_timeout=5,join_timeout=300"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=1"]
    cmd += ["--max-restarts=3", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"]
    cmd += ["--rdzv-id=arcscale-elastic", f"--rdzv-conf={conf}", "--monitor-interval=0.5"]
    # torch 2.14 agents share the rendezvous TCP store with the workers; an agent that was rank 0
    # before a restart then never publishes MASTER_ADDR for a node that joins (docs/clusters.md).
    env = {**launch_env(), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return Launch([*cmd, "-m", "trainer.train", CONFIG, *overrides], tmp_path, name, env=env)


def _segment(text, marker):
    """`text` from the last line holding `marker` to the next `world size N on` line."""
    tail = text[text.rindex(marker) :]
    nxt = re.search(r"^\[arcscale\] world size \d on", tail[len(marker) :], re.M)
    return tail[: len(marker) + nxt.start()] if nxt else tail


def test_elastic_agent_survives_a_lost_node_and_takes_one_back(lfw16, tmp_path):
    """Two torchrun elastic agents (`--nnodes=1:2`, c10d rendezvous) train at world size 2; one
    is killed with its rank: the survivor's rank stops on the failed collective (exit 4), its
    agent re-forms the group at world size 1 and the run resumes from the last checkpoint with
    gradient accumulation 2 (elastic.on_resize=keep_global_batch: global batch 32 kept); a new
    agent joining makes the agent stop its rank (SIGTERM: checkpoint of that step) and restart
    at world size 2 (accumulation 1), and the run finishes. After each resume every step is
    trained once."""
    out, steps = tmp_path / "run", 14
    ov = tiny_overrides(out, lfw16, NUM, steps, "engine.precision=fp32", "checkpoint.every=2")
    # timeout_s bounds the start-up store wait too: a rank may wait minutes on a JIT build lock
    # on a busy machine; a killed peer is seen at once (connection reset), not after it.
    ov += ["checkpoint.resume=true", "engine.timeout_s=300", "preemption.sync_every=1"]
    port = free_port()
    second = _agent(tmp_path, "b", port, False, ov)  # waits for the store the host opens
    first = _agent(tmp_path, "a", port, True, ov)

    def both():
        return first.stdout + second.stdout

    _poll(lambda: re.search(r"^Step 4/", both(), re.M) or first.proc.poll() is not None, 900)
    assert "world size 2 on" in both(), both()[-3000:]
    second.kill()

    def solo_trains():
        text = first.stdout
        if "world size 1 on" not in text:
            return first.proc.poll() is not None
        seg = _segment(text, "world size 1 on")
        return "resumed from" in seg and losses(seg) or first.proc.poll() is not None

    _poll(solo_trains, 900)
    third = _agent(tmp_path, "c", port, False, ov)
    first.ok(timeout=900), third.ok(timeout=300)
    a, c = first.stdout, third.stdout
    assert "a collective failed" in first.stderr
    assert "world size 2 -> 1, elastic.on_resize=keep_global_batch: optim.gradient_acc 1 -> 2" in a
    solo = _segment(a, "world size 1 on")
    k1 = int(re.search(r"resumed from \S+ at step (\d+)", solo).group(1))
    trained = sorted(losses(solo))
    assert trained == list(range(k1 + 1, trained[-1] + 1)), (k1, trained)
    assert "SIGTERM: stopped after step" in solo  # the agent's restart for the new node
    text = a + c
    assert "world size 1 on cpu" in solo and "global batch 32," in solo  # 1 x 16 x acc 2
    final = c if "world size 2 on" in c else a[a.rindex("world size 1 on") :]
    assert re.search(r"world size 2 on cpu, .* global batch 32,", final)  # acc back to 1
    k2 = max(int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", text))
    assert k2 == trained[-1]  # the SIGTERM checkpoint: no step lost at the scale-up
    last = sorted(losses(_segment(final, "world size 2 on")))
    assert last == list(range(k2 + 1, steps + 1)), (k2, last)
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{steps}"

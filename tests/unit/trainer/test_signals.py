"""trainer/signals.py: the signal flag, the ranks' agreement on the stop step (2 gloo ranks),
exit codes, the stop line and the SLURM requeue call; trainer/slurm.py: SLURM task variables
-> RANK/WORLD_SIZE/...; trainer/elastic.py: the global batch / LR rule on a world-size change."""

import os
import signal
import subprocess
from types import SimpleNamespace

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.paths import REPO
from trainer.config import ConfigError, load_config
from trainer.signals import (
    StopSignal,
    exit_code,
    requeue_note,
    requeue_slurm_job,
    signal_number,
    stop_line,
)
from trainer.slurm import first_host, slurm_env, tasks_per_node

CPU = torch.device("cpu")
SYNTH = os.path.join(REPO, "configs", "synthetic_tiny.yaml")


def test_signal_names_and_exit_codes():
    assert signal_number("SIGTERM") == signal_number("term") == signal_number("15") == 15
    assert signal_number("USR1") == signal.SIGUSR1
    for bad in ("SIGKILL", "STOP", "9", "nope"):
        with pytest.raises(ValueError):
            signal_number(bad)
    assert (exit_code(signal.SIGINT), exit_code(signal.SIGTERM)) == (130, 143)


def test_bad_preemption_config_is_one_line(tmp_path):
    cfg = SYNTH
    with pytest.raises(ConfigError, match=r"preemption\.signals: 'KILL' is not one of"):
        load_config(cfg, ["preemption.signals=[KILL]"])
    with pytest.raises(ConfigError, match=r"preemption\.sync_every: must be >= 1"):
        load_config(cfg, ["preemption.sync_every=0"])
    with pytest.raises(ConfigError, match=r"elastic\.on_resize: must be one of"):
        load_config(cfg, ["elastic.on_resize=grow"])


def test_signal_sets_the_flag_only_and_handlers_come_back():
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopSignal(["SIGUSR1", "SIGTERM"], sync_every=3, device=CPU)
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # handled between bytecodes: the test goes on
        os.kill(os.getpid(), signal.SIGTERM)  # a later signal does not replace the first
        assert stop.received == signal.SIGUSR1
        assert [stop.agreed(s, world=1) for s in (1, 2, 3)] == [0, 0, signal.SIGUSR1]
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) == before


def _agree(rank, world):
    stop = StopSignal(["SIGUSR1"], sync_every=2, device=CPU)
    stop.install()
    try:
        if rank == 1:  # only one rank sees the signal
            os.kill(os.getpid(), signal.SIGUSR1)
        return [stop.agreed(step, world) for step in (1, 2, 3, 4)]
    finally:
        stop.restore()


def test_ranks_agree_on_the_stop_step_when_one_rank_got_the_signal():
    """Rank 1 alone receives SIGUSR1: at the next check step (2) both ranks return it."""
    assert run_distributed(_agree, world_size=2) == [[0, 10, 0, 10]] * 2


def test_stop_line_and_requeue():
    line = stop_line(
        10, 40, "/r/checkpoints/step_40", 3.25, requeue_note(True, {"SLURM_JOB_ID": "7"})
    )
    assert line.startswith(
        "[arcscale] SIGUSR1: stopped after step 40, checkpoint /r/checkpoints/step_40"
    )
    assert "exit 138, requeueing SLURM job 7;" in line and "\n" not in line
    assert (
        "not requeued" in requeue_note(True, {})
        and requeue_note(False, {"SLURM_JOB_ID": "7"}) == ""
    )
    calls = []

    def ok(cmd, **kw):
        calls.append(cmd)
        return SimpleNamespace(returncode=0, stdout="", stderr="")

    def refused(cmd, **kw):
        return SimpleNamespace(
            returncode=1, stdout="", stderr="scontrol: error: Job is not requeueable\n"
        )

    assert requeue_slurm_job({"SLURM_JOB_ID": "7"}, ok) is None and calls == [
        ["scontrol", "requeue", "7"]
    ]
    assert "Job is not requeueable" in requeue_slurm_job({"SLURM_JOB_ID": "7"}, refused)
    assert requeue_slurm_job({}, ok) is None and len(calls) == 1


def _missing(cmd, **kw):
    raise FileNotFoundError(cmd[0])


# --- SLURM variables ---------------------------------------------------------------------------


SRUN = {
    "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
    "SLURM_STEP_NUM_TASKS": "10", "SLURM_STEP_TASKS_PER_NODE": "4(x2),2",
    "SLURM_STEP_NODELIST": "gpu[07-09]", "SLURM_JOB_ID": "123", "SLURM_NTASKS": "12",
}  # fmt: skip


def test_srun_task_becomes_a_rank(monkeypatch):
    monkeypatch.setattr(subprocess, "run", _missing)  # no scontrol: the list is parsed
    env = dict(SRUN)
    assert slurm_env(env)
    got = {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    assert got == {"RANK": "5", "WORLD_SIZE": "10", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert env["MASTER_ADDR"] == "gpu07" and env["MASTER_PORT"] == str(15000 + 123)


def test_batch_shell_and_launchers_are_left_alone():
    batch = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}  # the sbatch script itself
    assert not slurm_env(batch) and "RANK" not in batch
    under_torchrun = {**SRUN, "RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3"}
    assert not slurm_env(under_torchrun) and under_torchrun["RANK"] == "3"
    given = {**SRUN, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert slurm_env(given) and (given["MASTER_ADDR"], given["MASTER_PORT"]) == (
        "10.0.0.1",
        "29500",
    )


def test_slurm_lists():
    assert [tasks_per_node("4(x2),2", n) for n in range(3)] == [4, 4, 2]
    assert tasks_per_node("8", 0) == 8
    with pytest.raises(ValueError):
        tasks_per_node("4(x2)", 2)
    with pytest.raises(ValueError):
        tasks_per_node("four", 0)


def test_first_host_without_scontrol(monkeypatch):
    monkeypatch.setattr(subprocess, "run", _missing)
    assert first_host("node12") == "node12"
    assert first_host("gpu[07-09,12],cpu01") == "gpu07"


# --- elastic rule ------------------------------------------------------------------------------


def _resized(monkeypatch, rule, world, saved_world, saved, overrides=()):
    import trainer.checkpoint as ckpt
    from trainer.elastic import resized_config

    meta = {"world_size": saved_world, "config": saved}
    monkeypatch.setattr(ckpt, "resolve_resume", lambda resume, output, rank=0: "/ck/step_4")
    monkeypatch.setattr(ckpt, "load_meta", lambda path: meta)
    cfg_path = SYNTH
    cfg = load_config(cfg_path, [f"elastic.on_resize={rule}", "checkpoint.resume=true", *overrides])
    lines = []
    return resized_config(cfg, world, lines.append), lines


def test_keep_global_batch_by_accumulation_through_a_chain(monkeypatch):
    at2 = {"data": {"batch_size": 16}, "optim": {"gradient_acc": 1, "lr": 0.1}}
    cfg, lines = _resized(monkeypatch, "keep_global_batch", 1, 2, at2)
    assert cfg.optim.gradient_acc == 2 and cfg.optim.lr == 0.1
    assert lines == ["[arcscale] world size 2 -> 1, elastic.on_resize=keep_global_batch: "
                     "optim.gradient_acc 1 -> 2 (global batch 32)"]  # fmt: skip
    at1 = {"data": {"batch_size": 16}, "optim": {"gradient_acc": 2, "lr": 0.1}}  # its checkpoint
    assert _resized(monkeypatch, "keep_global_batch", 1, 1, at1)[0].optim.gradient_acc == 2
    assert _resized(monkeypatch, "keep_global_batch", 2, 1, at1)[0].optim.gradient_acc == 1
    cfg, lines = _resized(monkeypatch, "keep_global_batch", 3, 2, at2)  # 32 / (16 x 3)
    assert cfg.optim.gradient_acc == 1 and "not a multiple" in lines[0]
    cfg, lines = _resized(monkeypatch, "keep_global_batch", 1, 2, at2, ["data.batch_size=32"])
    assert cfg.optim.gradient_acc == 1 and lines == []  # the user sized the batch: as asked


def test_scale_lr_and_off(monkeypatch):
    at2 = {"data": {"batch_size": 16}, "optim": {"gradient_acc": 1, "lr": 0.1}}
    cfg, lines = _resized(monkeypatch, "scale_lr", 1, 2, at2)
    assert cfg.optim.gradient_acc == 1 and cfg.optim.lr == pytest.approx(0.05)
    at1 = {"data": {"batch_size": 16}, "optim": {"gradient_acc": 1, "lr": 0.05}}
    assert _resized(monkeypatch, "scale_lr", 2, 1, at1)[0].optim.lr == pytest.approx(0.1)
    cfg, lines = _resized(monkeypatch, "none", 1, 2, at2)
    assert (cfg.optim.gradient_acc, cfg.optim.lr, lines) == (1, 0.1, [])

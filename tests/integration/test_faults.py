"""Fault injection through the real launcher: kill -9, resume on another world size, NaN losses,
fp16 overflow, corrupt data, bad configs and a dying rank (docs/reliability.md maps each fault
to the test that shows it).

These run the real `accelerate launch` on the 16-identity LFW `.rec` (the `lfw16` fixture); the
in-process fault tests call the data layer (tests/unit/data/test_data_faults.py) and
`trainer.train.main` (tests/unit/trainer/test_config_faults.py).
"""

import glob
import json
import os
import random
import re
import time

import numpy as np
import pytest
import torch

from tests.helpers.faults import CONFIG, NUM, SEED, bad_configs, corrupt_copy, open_dataset
from tests.helpers.launch import (
    REPO,
    Launch,
    accelerate_cmd,
    kill_tree,
    launch_env,
    losses,
    run_cmd,
    tiny_overrides,
    train_cmd,
)

ZERO2 = "accelerate_configs/cpu_2proc_zero2.yaml"


def _launch(tmp, name, overrides, nproc=2, env=None):
    """`accelerate launch` of CONFIG on `nproc` processes (ZeRO-2) as a `Launch`; `env`: extra
    variables."""
    cmd = accelerate_cmd(CONFIG, overrides, ZERO2, ["--num_processes", str(nproc)])
    return Launch(cmd, tmp, name, env={**launch_env(), **(env or {})})


def _ov(out, data, steps, *more):
    return tiny_overrides(out, data, NUM, steps, "engine.precision=fp32", *more)


def _poll(pred, timeout=600, every=0.02):
    end = time.time() + timeout
    while time.time() < end:
        hit = pred()
        if hit:
            return hit
        time.sleep(every)
    raise AssertionError("condition not reached in time")


def _assert_complete(path):
    """A checkpoint dir a resume can use: meta.json, backbone.pt, one head shard per rank."""
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    assert os.path.isfile(os.path.join(path, "backbone.pt")), path
    shards = glob.glob(os.path.join(path, "head", "*.pt"))
    assert len(shards) == meta["world_size"], (path, shards)
    return meta


def _latest(out):
    root = os.path.join(out, "checkpoints")
    with open(os.path.join(root, "latest")) as f:
        return os.path.join(root, f.read().strip())


def _all_finite(path):
    tensors = list(torch.load(os.path.join(path, "backbone.pt"), weights_only=True).values())
    for shard in glob.glob(os.path.join(path, "head", "*.pt")):
        state = torch.load(shard, weights_only=False)
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors if t.is_floating_point())


# --- kill -9 ---------------------------------------------------------------------------------


def test_kill9_during_checkpoint_write_and_at_random_point(lfw16, tmp_path):
    """SIGKILL of the whole process group while a step_N.tmp is being written, then at a seeded
    random moment of the resumed run: `latest` always names a complete checkpoint, the next
    start reports and removes the half-written folder, and the last resume reaches the end."""
    out = tmp_path / "run"
    root = out / "checkpoints"
    ov = _ov(out, lfw16, 10, "checkpoint.every=2", "checkpoint.keep_last=10")

    def kill_on_tmp(run, after):
        """Kills the group the moment a `step_N.tmp` with N > after shows up; returns its name."""

        def seen():
            names = os.listdir(root) if root.is_dir() else []
            tmps = [n for n in names if re.fullmatch(r"step_(\d+)\.tmp", n)]
            tmps = [n for n in tmps if int(n[5:-4]) > after]
            if tmps:
                kill_tree(run.proc.pid)
                return tmps[0]
            return "done" if run.proc.poll() is not None else None

        name = _poll(seen, every=0.002)
        run.proc.wait(timeout=60)
        return name

    run, after, caught = _launch(tmp_path, "a0", ov), 2, None
    for attempt in range(3):  # the write takes ~0.2 s: retry if the kill lands after the rename
        name = kill_on_tmp(run, after)
        assert name != "done", "the run ended before any checkpoint write was seen"
        if (root / name).is_dir():
            caught = name
            break
        after = int(name[5:-4])
        run = _launch(tmp_path, f"a{attempt + 1}", [*ov, "checkpoint.resume=true"])
    assert caught, "no kill landed inside a checkpoint write in 3 tries"
    assert int(_latest(out).rsplit("_", 1)[1]) < int(caught[5:-4])
    _assert_complete(_latest(out))
    before = _latest(out)

    rng = random.Random(8)
    second = _launch(tmp_path, "b", [*ov, "checkpoint.resume=true"])
    _poll(lambda: "Step " in second.stdout or second.proc.poll() is not None)
    time.sleep(rng.uniform(0.5, 4.0))
    second.kill()
    assert f"removing incomplete checkpoint {root / caught}" in second.stdout
    assert f"resumed from {before} at step" in second.stdout
    saved = _latest(out)
    _assert_complete(saved)
    at = int(saved.rsplit("_", 1)[1])

    third = _launch(tmp_path, "c", [*ov, "checkpoint.resume=true"])
    stdout = third.ok()
    assert f"resumed from {saved} at step {at}" in stdout
    assert sorted(losses(stdout)) == list(range(at + 1, 11))
    assert _latest(out).endswith("step_10")
    assert not glob.glob(str(root / "*.tmp"))
    for path in glob.glob(str(root / "step_*")):
        _assert_complete(path)


# --- resume on another world size ------------------------------------------------------------


def _head_state(path):
    """(rows, {optimizer state key: rows}) of a checkpoint in global class order."""
    shards = []
    for f in glob.glob(os.path.join(path, "head", "*.pt")):
        shards.append(torch.load(f, weights_only=False))
    shards.sort(key=lambda sh: sh["start"])
    assert [sh["start"] for sh in shards][1:] == [sh["end"] for sh in shards][:-1]
    rows = torch.cat([sh["weight"] for sh in shards])
    keys = shards[0]["optimizer"]["state"].keys()
    state = {k: torch.cat([sh["optimizer"]["state"][k] for sh in shards]) for k in keys}
    return rows, state


def _assert_same_state(a, b):
    ma, mb = torch.load(os.path.join(a, "backbone.pt")), torch.load(os.path.join(b, "backbone.pt"))
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    (ra, sa), (rb, sb) = _head_state(a), _head_state(b)
    assert torch.equal(ra, rb) and sa.keys() == sb.keys() and len(sa) > 0
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    with open(os.path.join(a, "meta.json")) as fa, open(os.path.join(b, "meta.json")) as fb:
        assert json.load(fa)["loader"] == json.load(fb)["loader"]


def test_resume_other_world_size_restores_state_exactly(lfw16, tmp_path):
    """A 2-process step_2 resumed on 3 and 1 processes, and the 3-process copy on 2 again
    (global batch 48 throughout: 2x24, 3x16, 1x48), with max_steps=2 so each run loads and
    re-saves: backbone weights and BatchNorm stats, head rows, head momentum and the loader's
    global position come back bit-identical on every world size."""
    base = ["checkpoint.every=2", "head.sample_rate=1.0"]

    def ov(name, bs, *more):
        return _ov(tmp_path / name, lfw16, 2, *base, f"data.batch_size={bs}", *more)

    _launch(tmp_path, "ref", ov("ref", 24)).ok()
    ref = str(tmp_path / "ref" / "checkpoints" / "step_2")
    assert json.loads((tmp_path / "ref" / "checkpoints" / "step_2" / "meta.json").read_text())[
        "loader"
    ] == {"epoch": 0, "offset": 96}
    for name, nproc, bs, src in (("w3", 3, 16, ref), ("w1", 1, 48, ref)):
        stdout = _launch(tmp_path, name, ov(name, bs, f"checkpoint.resume={src}"), nproc=nproc).ok()
        assert f"world size 2 -> {nproc}" in stdout and "resumed from" in stdout
        again = str(tmp_path / name / "checkpoints" / "step_2")
        assert _assert_complete(again)["world_size"] == nproc
        _assert_same_state(ref, again)
    w3 = str(tmp_path / "w3" / "checkpoints" / "step_2")
    stdout = _launch(tmp_path, "w2", ov("w2", 24, f"checkpoint.resume={w3}")).ok()
    assert "world size 3 -> 2" in stdout
    _assert_same_state(ref, str(tmp_path / "w2" / "checkpoints" / "step_2"))


def _tb_loss(run_dir, step):
    from evaluation.runs import read_scalars

    steps, values = read_scalars(os.path.join(run_dir, "tensorboard"))["train/loss"]
    return values[steps.index(step)]


def test_resume_other_world_size_continues_the_loss_curve(lfw16, tmp_path):
    """fp32, same data order, `engine.sync_bn=true`: the step-3 loss of a 2x24 run equals,
    within 1e-4, the step-3 loss of its step-2 checkpoint resumed on 1x48 and on 3x16
    (TensorBoard values, full float32 precision; the console rounds to 4 decimals)."""
    base = ["checkpoint.every=2", "checkpoint.keep_last=2", "head.sample_rate=1.0"]
    base += ["engine.sync_bn=true"]
    base += ["logging.frequent=1", "schedule.max_steps=3"]

    def ov(name, bs, *more):
        return _ov(tmp_path / name, lfw16, 3, *base, f"data.batch_size={bs}", *more)

    _launch(tmp_path, "ref", ov("ref", 24)).ok()
    ref_loss = _tb_loss(tmp_path / "ref", 3)
    step2 = str(tmp_path / "ref" / "checkpoints" / "step_2")
    got = {}
    for name, nproc, bs in (("w1", 1, 48), ("w3", 3, 16)):
        stdout = _launch(
            tmp_path, name, ov(name, bs, f"checkpoint.resume={step2}"), nproc=nproc
        ).ok()
        assert f"world size 2 -> {nproc}" in stdout
        assert min(losses(stdout)) == 3  # the first step it trained is the one after step_2
        got[name] = _tb_loss(tmp_path / name, 3)
    for name, loss in got.items():
        assert abs(loss - ref_loss) < 1e-4, (name, loss, ref_loss)


# --- non-finite loss -------------------------------------------------------------------------


def test_nan_loss_skipped_counted_then_stops_exit3(lfw16, tmp_path):
    """NaN head loss (ARCSCALE_FAULT_NAN_LOSS) at steps 3-4 is skipped and counted; from step 7
    on it stops the run after engine.max_bad_steps=3 with exit code 3, a message naming the step
    and the last good checkpoint, and no checkpoint written from a non-finite step."""
    out = tmp_path / "nan"
    ov = _ov(out, lfw16, 12, "checkpoint.every=2", "checkpoint.keep_last=10")
    run = _launch(
        tmp_path,
        "nan",
        [*ov, "engine.max_bad_steps=3"],
        env={"ARCSCALE_FAULT_NAN_LOSS": "3-4,7-100"},
    )
    rc = run.wait()
    stdout, stderr = run.stdout, run.stderr
    assert rc != 0
    assert re.search(r"exitcode\s*:\s*3", stderr), stderr[-3000:]
    skipped = {
        int(m.group(1)): int(m.group(2))
        for m in re.finditer(r"^Step (\d+)/\d+ .* skipped_steps (\d+)", stdout, re.M)
    }
    assert skipped[2] == 0 and skipped[3] == 1 and skipped[4] == 2 and skipped[6] == 2
    assert skipped[8] == 4 and 9 not in skipped
    curve = losses(stdout)
    assert np.isnan(curve[3]) and np.isnan(curve[8]) and np.isfinite(curve[5])
    root = out / "checkpoints"
    good = str(root / "step_6")
    assert "at step 9" in stderr and f"last good checkpoint: {good}" in stderr
    assert "step 8: not saved" in stdout
    names = sorted(os.path.basename(p) for p in glob.glob(str(root / "step_*")))
    assert names == ["step_2", "step_6"], names
    assert _latest(out) == good
    for path in glob.glob(str(root / "step_*")):
        assert _all_finite(path), path


def _cpu_fp16():
    """DeepSpeed's own check: its CPU accelerator runs fp16 only with oneDNN fp16 kernels."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().is_fp16_supported()


BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _params(path):
    """backbone.pt without BatchNorm buffers (the forward of a skipped step still updates them)."""
    state = torch.load(os.path.join(path, "backbone.pt"), weights_only=True)
    return {k: v for k, v in state.items() if not k.endswith(BN_BUFFERS)}


@pytest.mark.skipif(
    torch.cuda.is_available() or not _cpu_fp16(), reason="fp16 on CPU needs oneDNN fp16 kernels"
)
def test_fp16_overflow_skips_engine_and_head_together(lfw16, tmp_path):
    """A real fp16 run (ZeRO-2, dynamic loss scale from S = 2^16, hysteresis 1): the first steps
    overflow; each is skipped by the engine and the head together (their weights equal the
    previous checkpoint's, the head's the seeded initial centers), counted in skipped_steps,
    and halves S; once S fits, steps apply, the loss is finite and the run finishes."""
    from evaluation.runs import read_scalars
    from heads import init_centers

    with open(os.path.join(REPO, "ds_configs", "zero1_fp16.json")) as f:
        ds = json.load(f)
    ds["fp16"].update(initial_scale_power=16, hysteresis=1)
    ds_path = tmp_path / "fp16.json"
    ds_path.write_text(json.dumps(ds))
    out = tmp_path / "fp16"
    steps = 8
    ov = _ov(out, lfw16, steps, "engine.precision=fp16", f"engine.ds_config={ds_path}")
    stdout = _launch(
        tmp_path, "fp16", [*ov, "checkpoint.every=1", f"checkpoint.keep_last={steps}"]
    ).ok()
    assert "ZeRO-2 fp16" in stdout
    tb = read_scalars(str(out / "tensorboard"))  # full float32, the console rounds to 4 digits
    cols = [dict(zip(*tb[f"train/{k}"], strict=True)) for k in ("loss_scale", "grad_norm")]
    cols.append(dict(zip(*tb["train/skipped_steps"], strict=True)))
    rows = {step: tuple(c[step] for c in cols) for step in cols[0]}
    assert sorted(rows) == list(range(1, steps + 1)), rows
    assert rows[1] == (65536.0, float("inf"), 1)
    root = out / "checkpoints"
    prev_head = init_centers(NUM, 0, NUM, 64, seed=SEED)  # the trainer seeds the head with cfg.seed
    prev_params, applied = None, 0
    for step in range(1, steps + 1):
        scale, grad_norm, skipped = rows[step]
        was_skipped = skipped == (rows[step - 1][2] if step > 1 else 0) + 1
        head, _ = _head_state(str(root / f"step_{step}"))
        params = _params(str(root / f"step_{step}"))
        if was_skipped:
            assert not np.isfinite(grad_norm), (step, rows[step])
            assert torch.equal(head, prev_head), step
            if prev_params is not None:
                assert all(torch.equal(params[k], prev_params[k]) for k in params), step
            if step < steps:
                assert rows[step + 1][0] == scale / 2, (step, rows)
        else:
            applied += 1
            assert np.isfinite(grad_norm) and skipped == rows[step - 1][2], (step, rows)
            assert not torch.equal(head, prev_head), step
            assert step == steps or rows[step + 1][0] == scale, (step, rows)
        prev_head, prev_params = head, params
    assert 1 <= rows[steps][2] < steps and applied == steps - rows[steps][2], rows
    assert all(np.isfinite(v) for v in losses(stdout).values())
    for path in glob.glob(str(root / "step_*")):
        assert _all_finite(path), path


# --- data faults -----------------------------------------------------------------------------


def test_skip_corrupt_run_logs_count_per_epoch(lfw16, tmp_path):
    """A 2-process run over the corrupted copy with data.skip_corrupt=true finishes; each rank
    logs the records it skipped in epoch 0 (15 steps) and so far in epoch 1 (1 step)."""
    bad = corrupt_copy(lfw16, str(tmp_path / "bad"))
    data = str(tmp_path / "bad")
    run = _launch(tmp_path, "skip", _ov(tmp_path / "out", data, 16, "data.skip_corrupt=true"))
    stdout = run.ok()
    assert len(losses(stdout)) == 16
    keys = open_dataset(data).keys
    for epoch, used in ((0, 15 * 32), (1, 32)):
        seen = set(epoch_perm(len(keys), epoch)[:used].tolist())
        want = sum(keys.index(k) in seen for k in bad)
        lines = re.findall(rf"rank \d epoch {epoch}.*?: skipped (\d+) corrupt", stdout)
        assert sum(int(n) for n in lines) == want, (epoch, want, stdout[-3000:])


def epoch_perm(n, epoch):
    from data.sampler import epoch_permutation

    return epoch_permutation(n, SEED, epoch)


# --- config faults ---------------------------------------------------------------------------


def test_config_fault_through_python_and_launcher(lfw16, tmp_path):
    """`python -m trainer.train` exits 2 with one stderr line; `accelerate launch` fails with
    the ranks' exit code 2 and the same line, before any process group (no training output)."""
    overrides, needle = bad_configs(lfw16, tmp_path)["num_classes"]
    proc = run_cmd(train_cmd(CONFIG, overrides), timeout=300)
    lines = [x for x in proc.stderr.splitlines() if x.strip() and "[WARNING]" not in x]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    run = _launch(tmp_path, "cfg", overrides)
    assert run.wait() != 0
    stderr = run.stderr
    ours = [x for x in stderr.splitlines() if x.startswith("arcscale:")]
    # The agent stops the other rank once one exits 2: it may not have printed its line yet.
    assert 1 <= len(ours) <= 2 and len(set(ours)) == 1 and needle in ours[0], stderr[-3000:]
    assert re.search(r"exitcode\s*:\s*2", stderr) and "world size" not in run.stdout


# --- distributed faults ----------------------------------------------------------------------


def test_dead_rank_ends_launch_within_timeout(lfw16, tmp_path):
    """Rank 1 calls os._exit(1) before step 4 (ARCSCALE_FAULT_EXIT): the launch ends non-zero
    within engine.timeout_s + 60 s of it, and rank 0, if still alive, says what happened."""
    timeout_s = 30
    run = _launch(
        tmp_path,
        "exit",
        _ov(tmp_path / "out", lfw16, 8, f"engine.timeout_s={timeout_s}"),
        env={"ARCSCALE_FAULT_EXIT": "rank=1,step=4"},
    )
    _poll(lambda: "fault injection" in run.stderr or run.proc.poll() is not None)
    t0 = time.time()
    rc = run.wait(timeout=timeout_s + 120)
    assert rc != 0 and time.time() - t0 < timeout_s + 60
    stderr = run.stderr
    assert "rank 1 exits at step 4" in stderr
    assert "Step 3/8" in run.stdout and "Step 4/8" not in run.stdout
    if "arcscale: a collective failed" in stderr:
        assert "another rank probably died" in stderr

"""Entry point: `accelerate launch --config_file accelerate_configs/X.yaml -m trainer.train
configs/EXP.yaml [key=value ...]`, `deepspeed --hostfile H trainer/train.py configs/EXP.yaml`, or
`srun python -m trainer.train ...` (one SLURM task per GPU: trainer/slurm.py, tools/slurm/).

Parse -> check files (exit 2 on a bad config, before any process-group work) -> build data,
backbone engine, head -> train -> tear down in `finally`. Nothing happens at import. Once the
config is read, the console of the run is kept in `<output>/training.log` (config, versions,
world size, every printed line, errors with their traceback; `trainer.logging_utils.run_log`).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import warnings
from collections.abc import Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from trainer.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from trainer.engine import EngineSettings
    from trainer.faults import FaultInjector
    from trainer.signals import StopSignal


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for `engine.max_bad_steps` consecutive steps."""


def check_batch(
    cfg: Config,
    settings: EngineSettings,
    env: Mapping[str, str] | None = None,
    src: str = "experiment config",
) -> None:
    """The DeepSpeed JSON's `train_batch_size` must be "auto" or what DeepSpeed asserts; the
    other numbers are checked by `build_ds_config` (trainer/ds_settings.py).

    Raises:
        ConfigError: `train_batch_size` != batch_size x gradient_acc x WORLD_SIZE, naming `src`
            (the experiment config) and the JSON.
    """
    from trainer.engine import load_ds_json

    env = os.environ if env is None else env
    base = load_ds_json(settings.ds_config_path)
    total = base.get("train_batch_size", "auto")
    world = int(env.get("WORLD_SIZE", 1))
    want = cfg.data.batch_size * cfg.optim.gradient_acc * world
    if total != "auto" and int(total) != want:
        raise ConfigError(
            f"{src}: data.batch_size: {settings.ds_config_path} sets train_batch_size {total} but "
            f"batch_size {cfg.data.batch_size} x gradient_acc {cfg.optim.gradient_acc} x "
            f"world size {world} = {want} (use 'auto')"
        )


def _collective_failure(e: BaseException) -> bool:
    import torch.distributed as dist

    text = str(e)
    markers = ("gloo", "NCCL", "Timed out", "timed out", "Connection closed", "Connection reset")
    return isinstance(e, getattr(dist, "DistError", ())) or any(m in text for m in markers)


def _standalone_env(env: MutableMapping[str, str]) -> bool:
    """A bare `python -m trainer.train` (no launcher variables) runs as world size 1, as
    arcface_torch's `python train_v2.py` does: sets the variables a launcher would. Returns
    whether it did."""
    if any(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return False
    from trainer.ports import free_port

    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        env["MASTER_PORT"] = str(free_port())
    return True


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="trainer.train", description="Train a face-recognition model (ArcFace + Partial FC)."
    )
    p.add_argument("config", help="experiment YAML (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.05")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    look = p.add_argument_group(
        "look before you launch (no process group; trainer/inspect_config.py)"
    )
    look.add_argument("--print-config", action="store_true", help="print the resolved config, exit")
    look.add_argument(
        "--dry-run",
        action="store_true",
        help="also build the model on the meta device, plan memory",
    )
    look.add_argument(
        "--diff", metavar="OTHER", help="differences from a config file or run folder"
    )
    look.add_argument(
        "--world-size", type=int, default=None, help="ranks (default: WORLD_SIZE or 1)"
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs a training job; returns the process exit code (2 for configuration errors)."""
    args = parse_args(argv)
    # DeepSpeed 0.19.8's ZeRO partitioning calls the collective torch 2.14 deprecated; ours use
    # the current API, so this warning is the only one a clean run would print every step.
    warnings.filterwarnings(
        "ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning
    )
    if args.local_rank is not None:  # the deepspeed launcher passes --local_rank
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.print_config or args.dry_run or args.diff:
        from trainer.inspect_config import inspect_main

        return inspect_main(args.config, args.overrides, args.dry_run, args.diff, args.world_size)
    from trainer.slurm import slurm_env

    try:
        if slurm_env(os.environ) and os.environ["RANK"] == "0":  # `srun python -m trainer.train`
            print(f"[arcscale] SLURM tasks as ranks: world size {os.environ['WORLD_SIZE']}")
    except ValueError as e:
        print(f"arcscale: config error: {e}", file=sys.stderr, flush=True)
        return 2
    standalone = _standalone_env(os.environ)
    from trainer.logging_utils import run_log

    try:
        cfg = load_config(args.config, args.overrides)
        from trainer.checkpoint import prepare_output_folder

        prepare_output_folder(cfg.output, cfg.checkpoint.overwrite)  # run_log writes there
    except ConfigError as e:
        print(f"arcscale: config error: {e}", file=sys.stderr, flush=True)
        return 2
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    with run_log(cfg, sys.argv if argv is None else ["trainer.train", *argv], rank, world):
        try:
            return _run(cfg, standalone, args.config)
        except KeyboardInterrupt:  # Ctrl-C before the loop's handler is in place
            print("arcscale: interrupted (SIGINT) before training; nothing saved", file=sys.stderr)
            return 130


def _run(cfg: Config, standalone: bool, src: str = "experiment config") -> int:
    """Checks, trains and maps the known failures to exit codes (inside the run log); `src`
    names the experiment config in error messages."""
    from trainer.checkpoint import preflight_output
    from trainer.data_setup import preflight
    from trainer.elastic import resized_config
    from trainer.engine import build_ds_config, resolve_engine_settings
    from trainer.faults import parse_faults
    from trainer.logging_utils import check_trackers
    from trainer.signals import StoppedBySignal

    try:
        preflight(cfg)
        preflight_output(cfg)
        cfg = resized_config(cfg, int(os.environ.get("WORLD_SIZE", "1")), _rank0_print())
        check_trackers(cfg)
        settings = resolve_engine_settings(cfg, src=src)
        ds_config = build_ds_config(cfg, settings, src)
        check_batch(cfg, settings, src=src)
        faults = parse_faults()
    except ConfigError as e:
        print(f"arcscale: config error: {e}", file=sys.stderr, flush=True)
        return 2
    if standalone:
        print("[arcscale] no launcher found: running as a single process (world size 1)")
    try:
        train(cfg, settings, ds_config, faults)
    except ConfigError as e:
        print(f"arcscale: config error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingDiverged as e:
        print(f"arcscale: training stopped: {e}", file=sys.stderr, flush=True)
        return 3
    except StoppedBySignal as e:  # rank 0 logged the line; the checkpoint is complete
        return e.code
    except Exception as e:
        if not _collective_failure(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(
            f"arcscale: a collective failed on rank {os.environ.get('RANK', '?')} "
            f"(engine.timeout_s={cfg.engine.timeout_s}): another rank probably died or hangs, "
            f"see its log; last checkpoint: {_latest_or_none(cfg.output)} ({first[:300]})",
            file=sys.stderr,
            flush=True,
        )
        return 4
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _rank0_print() -> Any:
    """`print` on rank 0 (RANK from the launcher), a no-op elsewhere: before the process group."""
    return print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)


def _latest_or_none(output: str) -> str:
    from models.weights import latest_checkpoint

    return latest_checkpoint(output) or "none"


def train(
    cfg: Config,
    settings: EngineSettings,
    ds_config: dict[str, Any],
    faults: FaultInjector | None = None,
) -> None:
    """The training loop: build the run, resume, step, save, evaluate, export (all ranks).

    Args:
        cfg, settings, ds_config: from `load_config`, `resolve_engine_settings`, `build_ds_config`.
        faults: a `trainer.faults.FaultInjector` (reliability tests only) or None.

    Raises:
        TrainingDiverged: the loss stayed non-finite for `engine.max_bad_steps` steps.
    """
    from trainer.lr import poly_lr
    from trainer.run import build_run, micro_batches
    from trainer.signals import StopSignal
    from trainer.step import train_step

    run = build_run(cfg, settings, ds_config)
    if cfg.logging.trackers:  # Accelerate starts them on the main process
        from trainer.logging_utils import init_trackers

        init_trackers(run.accelerator, cfg, run.logger)
    checkpointer = _checkpointer(cfg, run)
    step = checkpointer.resume()
    if faults is not None:
        faults.install(run.head)
    batches = micro_batches(run.loader, run.report_corrupt)
    total, bad_steps, skipped = run.res.total_steps, 0, 0
    stop = StopSignal(cfg.preemption.signals, cfg.preemption.sync_every, run.device)
    stop.install()  # a signal now only sets a flag: the step and any checkpoint write finish
    t_start = time.time()
    try:
        while step < total:
            lr = poly_lr(step, cfg.optim.lr, total, run.res.warmup_steps, cfg.schedule.power)
            run.set_lr(step, lr)  # head, backbone (scaled, frozen parts at 0)
            if faults is not None:
                faults.before_step(run.rank, step + 1)
            micro = [next(batches) for _ in range(cfg.optim.gradient_acc)]
            result = train_step(
                run.accelerator,
                run.engine,
                run.head,
                run.head_opt,
                micro,
                settings.precision,
                run.device,
                memory_format=run.memory_format,
            )
            step += 1
            skipped += not result.applied
            bad_steps = bad_steps + 1 if not result.loss_finite else 0  # host value: no sync
            if bad_steps >= cfg.engine.max_bad_steps:
                raise _diverged(cfg, step, bad_steps, checkpointer.last_saved)
            scalars = functools.partial(_scalars, result, run.engine, lr, skipped)
            finite_loss = result.loss if result.loss_finite else None  # interval mean
            run.logger.step(step, run.loader.epoch, scalars, cfg.logging.frequent, finite_loss)
            checkpointer.maybe_save(step, finite=bad_steps == 0)  # saved before evaluating
            if signum := stop.agreed(step, run.world):
                _stop_on_signal(run, checkpointer, stop, signum, step, finite=bad_steps == 0)
            if step % cfg.eval.verbose == 0 and step < total:
                run.evaluate(step)
        run.report_corrupt(run.loader.epoch, " (so far)")
        checkpointer.finish(step)
        run.evaluate(step)
        run.log(f"[arcscale] done: {step} steps in {time.time() - t_start:.1f}s, {skipped} skipped")
        for name, acc in (run.evaluator.highest if run.evaluator else {}).items():
            run.log(f"[arcscale] highest accuracy {name}: {acc:.5f}")
    finally:
        stop.restore()
        run.logger.close()


def _checkpointer(cfg: Config, run: Any) -> Any:
    """The run's `Checkpointer`, given the parts it saves."""
    from trainer.checkpoint import Checkpointer

    return Checkpointer(
        cfg,
        engine=run.engine,
        head=run.head,
        head_opt=run.head_opt,
        loader=run.loader,
        rank=run.rank,
        world=run.world,
        precision=run.settings.precision,
        zero_stage=run.settings.zero_stage,
        log=run.log,
    )


def _stop_on_signal(
    run: Any, checkpointer: Any, stop: StopSignal, signum: int, step: int, finite: bool
) -> None:
    """Checkpoints the step the ranks agreed to stop at (unless already saved or non-finite),
    logs one line, requeues the SLURM job when `preemption.requeue` asks (not on SIGINT: a
    Ctrl-C means stop), then raises.

    Raises:
        StoppedBySignal: always (`code` = 128 + signum is the process's exit status).
    """
    import signal

    from trainer.signals import StoppedBySignal, requeue_note, requeue_slurm_job, stop_line

    path = checkpointer.last_saved
    if finite and not (path and path.endswith(f"step_{step}")):
        checkpointer.save(step)
        path = checkpointer.last_saved
    elif not finite:
        path = None
    seconds = time.monotonic() - stop.received_at if stop.received else 0.0
    requeue = run.cfg.preemption.requeue and signum != signal.SIGINT  # Ctrl-C means stop
    run.log(stop_line(signum, step, path, seconds, requeue_note(requeue, os.environ)))
    sys.stdout.flush()
    if requeue and run.rank == 0 and (why := requeue_slurm_job(os.environ)):
        print(f"arcscale: {why}", file=sys.stderr, flush=True)
    raise StoppedBySignal(signum, step, path)


def _scalars(result: Any, engine: Any, lr: float, skipped: int) -> dict[str, float]:
    """The logged values of one step, read from the device in one transfer."""
    values = result.read(engine)
    return {
        "loss": values["loss"],
        "lr": lr,
        "loss_scale": values["loss_scale"],
        "grad_norm": values["grad_norm"],
        "num_sampled": values["num_sampled"],
        "skipped_steps": skipped,
    }


def _diverged(cfg: Config, step: int, bad_steps: int, last_saved: str | None) -> TrainingDiverged:
    return TrainingDiverged(
        f"loss non-finite for {bad_steps} consecutive steps at step {step}; last good "
        f"checkpoint: {last_saved or 'none'}. Likely causes: lr {cfg.optim.lr} too high, margin "
        f"{list(cfg.head.margin_list)} too hard (ViT needs AdamW and warmup), fp16 overflow "
        f"(try bf16)"
    )


if __name__ == "__main__":
    sys.exit(main())

"""Entry point: `accelerate launch --config_file accelerate_configs/X.yaml -m trainer.train
configs/EXP.yaml [key=value ...]` or `deepspeed --hostfile H trainer/train.py configs/EXP.yaml`.

Parse -> check files (exit 2 on a bad config, before any process-group work) -> build data,
backbone engine, head -> train -> tear down in `finally`. Nothing happens at import.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

if __package__ in (None, ""):  # run as a script by the `deepspeed` launcher
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from trainer.config import ConfigError, load_config, resolve, save_config, to_dict


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for `engine.max_bad_steps` consecutive steps."""


def parse_faults(env=None) -> dict:
    """Reads the fault-injection hooks (tests only; docs/reliability.md) from the environment.

    `ARCSCALE_FAULT_NAN_LOSS="5-100"` (or "3,7-9"): the head loss is NaN at those 1-based steps.
    `ARCSCALE_FAULT_EXIT="rank=1,step=4"`: that rank calls `os._exit(1)` before that step.

    Returns:
        {"nan_steps": set of int, "exit": (rank, step) or None}.

    Raises:
        ConfigError: a malformed value, naming the variable.
    """
    env = os.environ if env is None else env
    nan_steps: set[int] = set()
    spec = env.get("ARCSCALE_FAULT_NAN_LOSS", "").strip()
    try:
        for part in filter(None, spec.split(",")):
            lo, _, hi = part.partition("-")
            nan_steps.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ConfigError(
            f"ARCSCALE_FAULT_NAN_LOSS: expected steps like '5-100', got {spec!r}"
        ) from None
    exit_at = None
    spec = env.get("ARCSCALE_FAULT_EXIT", "").strip()
    if spec:
        try:
            fields = dict(item.split("=", 1) for item in spec.split(","))
            exit_at = (int(fields["rank"]), int(fields["step"]))
        except (ValueError, KeyError):
            raise ConfigError(
                f"ARCSCALE_FAULT_EXIT: expected 'rank=R,step=S', got {spec!r}"
            ) from None
    return {"nan_steps": nan_steps, "exit": exit_at}


def check_batch(cfg, settings, env=None) -> None:
    """A number in the DeepSpeed JSON that disagrees with the config is an error, not overwritten.

    Raises:
        ConfigError: `train_micro_batch_size_per_gpu` != `data.batch_size`, or
            `train_batch_size` != batch_size x gradient_acc x WORLD_SIZE (what DeepSpeed asserts).
    """
    from trainer.engine import load_ds_json

    env = os.environ if env is None else env
    base = load_ds_json(settings.ds_config_path)
    micro = base.get("train_micro_batch_size_per_gpu", "auto")
    if micro != "auto" and int(micro) != cfg.data.batch_size:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} but {settings.ds_config_path} sets "
            f"train_micro_batch_size_per_gpu {micro} (use 'auto' or make them equal)"
        )
    total = base.get("train_batch_size", "auto")
    world = int(env.get("WORLD_SIZE", 1))
    want = cfg.data.batch_size * cfg.optim.gradient_acc * world
    if total != "auto" and int(total) != want:
        raise ConfigError(
            f"data.batch_size: {settings.ds_config_path} sets train_batch_size {total} but "
            f"batch_size {cfg.data.batch_size} x gradient_acc {cfg.optim.gradient_acc} x "
            f"world size {world} = {want} (use 'auto')"
        )


def _collective_failure(e: BaseException) -> bool:
    import torch.distributed as dist

    text = str(e)
    markers = ("gloo", "NCCL", "Timed out", "timed out", "Connection closed", "Connection reset")
    return isinstance(e, getattr(dist, "DistError", ())) or any(m in text for m in markers)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="trainer.train", description="Train a face-recognition model (ArcFace + Partial FC)."
    )
    p.add_argument("config", help="experiment YAML (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.05")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Runs a training job; returns the process exit code (2 for configuration errors)."""
    args = parse_args(argv)
    if args.local_rank is not None:  # the deepspeed launcher passes --local_rank
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from trainer.data_setup import preflight
    from trainer.engine import build_ds_config, resolve_engine_settings

    try:
        cfg = load_config(args.config, args.overrides)
        preflight(cfg)
        settings = resolve_engine_settings(cfg)
        ds_config = build_ds_config(cfg, settings)
        check_batch(cfg, settings)
        faults = parse_faults()
    except ConfigError as e:
        print(f"arcscale: config error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        train(cfg, settings, ds_config, faults)
    except ConfigError as e:
        print(f"arcscale: config error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingDiverged as e:
        print(f"arcscale: training stopped: {e}", file=sys.stderr, flush=True)
        return 3
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


def _latest_or_none(output: str) -> str:
    from trainer.checkpoint import latest_checkpoint

    return latest_checkpoint(output) or "none"


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg, settings, ds_config, faults=None) -> None:
    """The training loop (see design.md "What flows where"); `faults` from `parse_faults`."""
    import models
    from heads import CombinedMarginLoss, PartialFC, build_head_optimizer
    from trainer import checkpoint as ckpt
    from trainer.data_setup import build_dataset, build_loader, val_bin_paths
    from trainer.engine import (
        build_backbone_optimizer,
        create_accelerator,
        dist_info,
        set_backbone_lr,
    )
    from trainer.evaluation import VerificationCallback
    from trainer.logging_utils import TrainLogger
    from trainer.lr import poly_lr
    from trainer.memory_format import input_memory_format
    from trainer.step import DTYPES, train_step
    from trainer.sync_bn import convert_sync_batchnorm

    _seed_everything(cfg.seed)
    accelerator = create_accelerator(cfg, ds_config, settings.precision)
    info = dist_info()
    rank, world, device = info.rank, info.world_size, info.device
    log = print if rank == 0 else (lambda *a, **k: None)

    dataset = build_dataset(cfg)
    loader = build_loader(cfg, dataset, rank, world, device)
    res = resolve(cfg, world, len(dataset))
    if rank == 0:
        os.makedirs(cfg.output, exist_ok=True)
        resolved = {**res.__dict__, **settings.__dict__}
        save_config(cfg, os.path.join(cfg.output, "config.yaml"), resolved)
        ckpt.write_text_atomic(
            os.path.join(cfg.output, "ds_config.json"), json.dumps(ds_config, indent=1)
        )
        ckpt.clean_incomplete(ckpt.checkpoint_root(cfg.output), log)
        log(
            f"[arcscale] world size {world} on {device}, ZeRO-{settings.zero_stage} "
            f"{settings.precision}, {cfg.model.network}, {cfg.data.num_classes} classes, "
            f"{res.num_image} images, global batch {res.global_batch}, "
            f"{res.steps_per_epoch} steps/epoch, {res.total_steps} steps"
        )

    backbone = models.create(
        cfg.model.network, embedding_size=cfg.model.embedding_size, **cfg.model.kwargs
    )
    if cfg.engine.sync_bn and world > 1:
        backbone = convert_sync_batchnorm(backbone)
    if cfg.model.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    memory_format, why = input_memory_format(backbone, device, cfg.engine.memory_format)
    log(f"[arcscale] input memory format: {why}")
    backbone_opt = build_backbone_optimizer(cfg, backbone)
    engine, _ = accelerator.prepare(backbone, backbone_opt)
    engine.train()

    m1, m2, m3 = cfg.head.margin_list
    margin = CombinedMarginLoss(cfg.head.scale, m1, m2, m3, cfg.head.interclass_filtering_threshold)
    head = PartialFC(
        cfg.model.embedding_size, cfg.data.num_classes, cfg.head.sample_rate, margin, seed=cfg.seed
    ).to(device)
    head_opt = build_head_optimizer(
        head,
        name=cfg.optim.optimizer,
        lr=cfg.optim.lr,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
    )

    step, epoch = 0, 0
    resume_path = ckpt.resolve_resume(cfg.checkpoint.resume, cfg.output, rank)
    if resume_path:
        meta = ckpt.load_checkpoint(resume_path, engine, head, head_opt, rank, world, log)
        step, epoch = int(meta["step"]), int(meta["epoch"])
        loader.set_epoch(epoch)
        loader.load_state_dict(meta["loader"])  # global-sample offset: any world size
        log(f"[arcscale] resumed from {resume_path} at step {step}, epoch {epoch}")
    else:
        loader.set_epoch(0)

    logger = TrainLogger(
        cfg.output,
        rank,
        res.total_steps,
        res.global_batch,
        use_tensorboard=cfg.logging.tensorboard,
        progress_bar=cfg.logging.progress_bar,
    )
    bins = val_bin_paths(cfg)
    evaluator = (
        VerificationCallback(
            bins,
            rank,
            world,
            batch_size=cfg.eval.batch_size,
            log_fn=logger.info,
            tb_writer=logger.writer,
            out_dir=cfg.output,
        )
        if bins
        else None
    )
    dtype = DTYPES[settings.precision]

    def model_forward(x):
        return engine(x.to(device, dtype)).float()

    def evaluate(at_step: int) -> None:
        if evaluator is None:
            return
        engine.eval()
        with torch.no_grad():
            evaluator(at_step, model_forward)
        engine.train()

    def save(at_step: int) -> None:
        meta = {
            "step": at_step,
            "epoch": loader.epoch,
            "loader": loader.state_dict(),
            "world_size": world,
            "network": cfg.model.network,
            "embedding_size": cfg.model.embedding_size,
            "model_kwargs": cfg.model.kwargs,
            "num_classes": cfg.data.num_classes,
            "precision": settings.precision,
            "zero_stage": settings.zero_stage,
            "config": to_dict(cfg),
        }
        ckpt.save_checkpoint(
            cfg.output, at_step, engine, head, head_opt, meta, rank, cfg.checkpoint.keep_last, log
        )

    faults = faults or {"nan_steps": set(), "exit": None}

    def report_corrupt(epoch: int, when: str) -> None:
        if loader_corrupt := getattr(loader, "corrupt", None):
            print(
                f"[arcscale] rank {rank} epoch {epoch}{when}: skipped {len(loader_corrupt)} "
                f"corrupt records (data.skip_corrupt); first: {loader_corrupt[0]}",
                flush=True,
            )

    batches = _micro_batches(loader, report_corrupt)
    bad_steps, skipped = 0, 0
    last_saved = ckpt.latest_checkpoint(cfg.output)  # same answer on every rank (shared disk)
    t_start = time.time()
    try:
        while step < res.total_steps:
            lr = poly_lr(step, cfg.optim.lr, res.total_steps, res.warmup_steps, cfg.schedule.power)
            set_backbone_lr(engine, lr)
            head_opt.set_lr(lr)
            if faults["exit"] == (rank, step + 1):
                msg = f"arcscale: fault injection: rank {rank} exits at step {step + 1}"
                print(msg, file=sys.stderr, flush=True)
                os._exit(1)
            micro = [next(batches) for _ in range(cfg.optim.gradient_acc)]
            result = train_step(
                accelerator,
                engine,
                head,
                head_opt,
                micro,
                settings.precision,
                device,
                nan_loss=step + 1 in faults["nan_steps"],
                memory_format=memory_format,
            )
            step += 1
            if not result.applied:
                skipped += 1
            bad_steps = bad_steps + 1 if not math.isfinite(result.loss) else 0
            if bad_steps >= cfg.engine.max_bad_steps:
                raise TrainingDiverged(
                    f"loss non-finite for {bad_steps} consecutive steps at step {step}; "
                    f"last good checkpoint: {last_saved or 'none'}. Likely causes: lr "
                    f"{cfg.optim.lr} too high, margin {list(cfg.head.margin_list)} too hard "
                    f"(ViT needs AdamW and warmup), fp16 overflow (try bf16)"
                )
            scalars = {
                "loss": result.loss,
                "lr": lr,
                "loss_scale": result.loss_scale,
                "grad_norm": _grad_norm(engine),
                "num_sampled": result.num_sampled,
                "skipped_steps": skipped,
            }
            logger.step(step, loader.epoch, scalars, cfg.logging.frequent)
            if step % cfg.eval.verbose == 0 and step < res.total_steps:
                evaluate(step)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and bad_steps:
                log(f"[checkpoint] step {step}: not saved, the loss is non-finite")
            elif cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                save(step)
                last_saved = os.path.join(ckpt.checkpoint_root(cfg.output), f"step_{step}")
        report_corrupt(loader.epoch, " (so far)")
        evaluate(step)
        if last_saved is None or not last_saved.endswith(f"step_{step}"):
            save(step)
        if rank == 0:  # arcface_torch users look for the final weights in the output folder
            final = os.path.join(ckpt.checkpoint_root(cfg.output), f"step_{step}", "backbone.pt")
            shutil.copyfile(final, os.path.join(cfg.output, "backbone.pt.tmp"))
            os.replace(
                os.path.join(cfg.output, "backbone.pt.tmp"), os.path.join(cfg.output, "backbone.pt")
            )
        log(f"[arcscale] done: {step} steps in {time.time() - t_start:.1f}s, {skipped} skipped")
        if evaluator is not None:
            for name, acc in evaluator.highest.items():
                log(f"[arcscale] highest accuracy {name}: {acc:.5f}")
    finally:
        logger.close()


def _grad_norm(engine) -> float:
    value = engine.get_global_grad_norm()
    if value is None:
        return float("nan")
    return float(value.item() if hasattr(value, "item") else value)


def _micro_batches(loader, at_epoch_end=None):
    """Endless (images, labels) stream; advances the loader's epoch at each epoch end."""
    while True:
        yield from loader
        if at_epoch_end is not None:
            at_epoch_end(loader.epoch, "")
        loader.set_epoch(loader.epoch + 1)


if __name__ == "__main__":
    sys.exit(main())

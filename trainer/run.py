"""Builds everything a training run needs into one `Run`: engine, head, loaders, evaluator, logger.

Order (design in docs/design.md): seed -> Accelerator + process group -> dataset and loader ->
run-folder files -> backbone (SyncBN, activation checkpointing, input layout) -> DeepSpeed engine
-> Partial FC head and its optimizer -> logger and verification callback.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from trainer.checkpoint.manager import check_output_shared
from trainer.config import Config, Resolved, build_head_margin, resolve, save_config
from trainer.engine import EngineSettings
from trainer.tf32 import enable_backbone_tf32

if TYPE_CHECKING:
    from heads import HeadOptimizer, PartialFC


@dataclass
class Run:
    """The built parts of one training run (every rank holds its own)."""

    cfg: Config
    settings: EngineSettings
    res: Resolved  # sizes derived from config + world size + dataset
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype  # the engine's parameter dtype
    memory_format: torch.memory_format  # layout of input batches on the device
    accelerator: Any
    engine: Any  # DeepSpeed engine of the backbone
    head: PartialFC  # outside ZeRO
    head_opt: HeadOptimizer
    loader: Any  # yields (images, labels); epoch/state_dict/load_state_dict
    evaluator: Any  # evaluation.callback.VerificationCallback or None
    logger: Any  # trainer.logging_utils.TrainLogger
    log: Callable[..., None]  # print on rank 0, silent elsewhere
    freeze: Any  # trainer.freeze.FreezePlan: fine-tuning controls applied every step

    def set_lr(self, step: int, lr: float) -> None:
        """The schedule's `lr` for optimizer step `step` (0-based): the head's as is, the
        backbone's scaled and frozen parts at 0 (`FreezePlan.apply`)."""
        self.freeze.apply(step, lr, self.engine.optimizer.param_groups)
        self.head_opt.set_lr(lr)

    def evaluate(self, step: int) -> None:
        """Verification on every `.bin` target (all ranks take part). A failure is logged and
        training goes on: an evaluation never costs the run or its checkpoint."""
        if self.evaluator is None:
            return
        from trainer.logging_utils import val_scalars

        self.engine.eval()
        try:
            with torch.no_grad():
                # module: all ranks evaluate with rank 0's BN statistics, those a checkpoint saves
                results = self.evaluator(
                    step,
                    lambda x: self.engine(x.to(self.device, self.dtype)).float(),
                    self.engine.module,
                )
            self.logger.log_metrics(val_scalars(results), step)  # trackers (rank 0)
        except Exception as e:  # noqa: BLE001 - logged, the run goes on
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"[eval] rank {self.rank} step {step}: evaluation failed: {first}", flush=True)
        finally:
            self.engine.train()

    def report_corrupt(self, epoch: int, when: str = "") -> None:
        """Logs the records `data.skip_corrupt` replaced so far (per rank)."""
        if corrupt := getattr(self.loader, "corrupt", None):
            print(
                f"[arcscale] rank {self.rank} epoch {epoch}{when}: skipped {len(corrupt)} "
                f"corrupt records (data.skip_corrupt); first: {corrupt[0]}",
                flush=True,
            )


def seed_everything(seed: int) -> None:
    """Seeds Python, numpy and torch (arcface_torch seeds all three with `seed`): every rank
    builds the same initial backbone (ZeRO-3 partitions each rank's copy as it is)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_rank_streams(seed: int, rank: int) -> None:
    """Re-seeds torch's generators (CPU and every CUDA device) with `seed + rank` once the
    models are built, so that dropout, drop-path and ViT token masking draw different masks
    on each rank, as independent samples of one global batch should (with `seed` everywhere all
    ranks drew the same masks). Sampling, shuffling and augmentation have their own per-rank
    generators; the RNG state saved in a checkpoint is this stream's, per rank."""
    torch.manual_seed(seed + rank)


def _write_run_files(
    cfg: Config, settings: EngineSettings, ds_config: dict[str, Any], res: Resolved
) -> None:
    from data.atomic import write_text_atomic
    from trainer import checkpoint as ckpt

    os.makedirs(cfg.output, exist_ok=True)
    save_config(cfg, os.path.join(cfg.output, "config.yaml"), {**res.__dict__, **settings.__dict__})
    write_text_atomic(os.path.join(cfg.output, "ds_config.json"), json.dumps(ds_config, indent=1))
    ckpt.clean_incomplete(ckpt.checkpoint_root(cfg.output))


def build_engine(
    cfg: Config,
    accelerator: Any,
    ds_config: dict[str, Any],
    device: torch.device,
    world: int,
    log: Callable[..., None],
) -> tuple[Any, torch.memory_format]:
    """The backbone (pretrained weights loaded when `model.pretrained` is set) inside its
    DeepSpeed engine, and the input memory format for it.

    Raises:
        ConfigError: unusable `model.pretrained` or `model.freeze_stages`.
    """
    import models
    from trainer.engine import prepare_backbone
    from trainer.freeze import param_groups
    from trainer.memory_format import input_memory_format
    from trainer.pretrained import load_pretrained
    from trainer.sync_bn import convert_sync_batchnorm

    net = models.create(
        cfg.model.network, embedding_size=cfg.model.embedding_size, **cfg.model.kwargs
    )
    load_pretrained(cfg, net, log)  # before ZeRO-3 partitions the parameters
    if cfg.model.grad_checkpointing:
        net.set_grad_checkpointing(True)
    backbone = convert_sync_batchnorm(net) if cfg.engine.sync_bn and world > 1 else net
    memory_format, why = input_memory_format(backbone, device, cfg.engine.memory_format)
    log(f"[arcscale] input memory format: {why}")
    groups = param_groups(cfg, backbone)
    return prepare_backbone(cfg, accelerator, backbone, ds_config, groups), memory_format


def build_head(
    cfg: Config, device: torch.device, precision: str
) -> tuple[PartialFC, HeadOptimizer]:
    from heads import PartialFC, build_head_optimizer, resolve_logits_dtype
    from heads.fused import resolve_fused

    margin = build_head_margin(cfg)
    head = PartialFC(
        cfg.model.embedding_size,
        cfg.data.num_classes,
        cfg.head.sample_rate,
        margin,
        seed=cfg.seed,
        logits_dtype=resolve_logits_dtype(cfg.head.logits_dtype, device, precision),
        fused=resolve_fused(cfg.head.kernels, device),
        num_subcenters=cfg.head.num_subcenters,
    ).to(device)
    head_opt = build_head_optimizer(
        head,
        name=cfg.optim.optimizer,
        lr=cfg.optim.lr,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        dense_decay=cfg.optim.head_decay == "dense",
    )
    return head, head_opt


def _build_evaluator(cfg: Config, rank: int, world: int, logger: Any) -> Any:
    from evaluation.callback import VerificationCallback
    from trainer.data_setup import val_bin_paths

    bins = val_bin_paths(cfg)
    if not bins:
        return None
    return VerificationCallback(
        bins,
        rank,
        world,
        batch_size=cfg.eval.batch_size,
        log_fn=logger.info,
        tb_writer=logger.writer,
        out_dir=cfg.output,
    )


def build_run(cfg: Config, settings: EngineSettings, ds_config: dict[str, Any]) -> Run:
    """Builds every part of a run on this rank (collective: every rank must call it).

    Raises:
        ConfigError: the dataset, device or engine settings contradict the config.
    """
    from trainer.data_setup import build_dataset, build_loader
    from trainer.device_batch import DevicePrefetcher
    from trainer.engine import create_accelerator, dist_info
    from trainer.freeze import build_freeze_plan
    from trainer.logging_utils import TrainLogger
    from trainer.precision import DTYPES

    seed_everything(cfg.seed)
    accelerator = create_accelerator(cfg, ds_config, settings.precision)
    info = dist_info()
    rank, world, device = info.rank, info.world_size, info.device
    log = print if rank == 0 else (lambda *a, **k: None)
    check_output_shared(cfg.output, rank, world)

    dataset = build_dataset(cfg)
    loader = build_loader(cfg, dataset, rank, world, device)
    res = resolve(cfg, world, len(dataset))
    if rank == 0:
        _write_run_files(cfg, settings, ds_config, res)
        log(
            f"[arcscale] world size {world} on {device}, ZeRO-{settings.zero_stage} "
            f"{settings.precision}, {cfg.model.network}, {cfg.data.num_classes} classes, "
            f"{res.num_image} images, global batch {res.global_batch}, "
            f"{res.steps_per_epoch} steps/epoch, {res.total_steps} steps"
        )
    engine, memory_format = build_engine(cfg, accelerator, ds_config, device, world, log)
    if device.type == "cuda":  # fixed input sizes: let cuDNN pick the fastest kernels once
        torch.backends.cudnn.benchmark = True
    if enable_backbone_tf32(device, settings.precision):
        log("[arcscale] fp32 engine on CUDA: matmuls and convolutions use TF32")
    head, head_opt = build_head(cfg, device, settings.precision)
    seed_rank_streams(cfg.seed, rank)
    dtype = DTYPES[settings.precision]
    logger = TrainLogger(
        cfg.output,
        rank,
        res.total_steps,
        res.global_batch,
        use_tensorboard=cfg.logging.tensorboard,
        progress_bar=cfg.logging.progress_bar,
    )
    return Run(
        cfg=cfg,
        settings=settings,
        res=res,
        rank=rank,
        world=world,
        device=device,
        dtype=dtype,
        memory_format=memory_format,
        accelerator=accelerator,
        engine=engine,
        head=head,
        head_opt=head_opt,
        loader=DevicePrefetcher(loader, device, dtype, memory_format),  # normalizes on device
        evaluator=_build_evaluator(cfg, rank, world, logger),
        logger=logger,
        log=log,
        freeze=build_freeze_plan(cfg, engine.module),
    )


def micro_batches(
    loader: Any, at_epoch_end: Callable[[int, str], None] | None = None
) -> Iterator[Any]:
    """Endless (images, labels) stream; advances the loader's epoch at each epoch end."""
    while True:
        yield from loader
        if at_epoch_end is not None:
            at_epoch_end(loader.epoch, "")
        loader.set_epoch(loader.epoch + 1)

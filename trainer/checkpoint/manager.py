"""A run's checkpoint policy (`Checkpointer`: every/keep_last, resume, no save of a non-finite
step, the final export) and the start-up decisions about the output folder (`preflight_output`,
`resolve_resume`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from data.atomic import atomic_path, make_writable_folder
from heads import HeadOptimizer, PartialFC
from models.weights import checkpoint_root, latest_checkpoint, read_state_dict, save_safetensors
from trainer.config import Config, ConfigError, to_dict

if TYPE_CHECKING:
    from deepspeed.runtime.engine import DeepSpeedEngine

from trainer.checkpoint.layout import Log, prepare_fresh_output
from trainer.checkpoint.store import Meta, load_checkpoint, load_meta, save_checkpoint
from trainer.checkpoint.verify import check_meta_fits


def _broadcast_str(value: str, rank: int) -> str:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box: list[str | None] = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0] or ""  # rank 0's string on every rank


def resume_off(resume: object) -> bool:
    """`checkpoint.resume` asks for a fresh start (false, or an empty / "false" string)."""
    return resume is False or resume in ("", "false", "False")


def resolve_resume(resume: bool | str, output: str, rank: int = 0) -> str | None:
    """`checkpoint.resume` -> a checkpoint dir: false -> None, true -> latest in `output` (None,
    logged by the caller, when there is none), a path -> that checkpoint or that run's latest.

    Raises:
        ConfigError: an explicit path that is not a complete checkpoint nor a run folder holding
            one (an explicit path never falls back to a fresh start), or a broken meta.json.
    """
    if resume_off(resume):
        return None
    if resume is True or resume in ("true", "True", "latest", "auto"):
        path = latest_checkpoint(output)
    else:
        given = str(resume)
        path = given
        if not os.path.isfile(os.path.join(path, "meta.json")):
            path = latest_checkpoint(given)
        if path is None:
            raise ConfigError(
                f"checkpoint.resume: {given} is not a complete checkpoint (no meta.json) nor a "
                f"run folder with one under checkpoints/"
            )
    path = _broadcast_str(path or "", rank) or None
    if path is not None:
        load_meta(path)
    return path


class Checkpointer:
    """Owns a run's checkpoints: the meta schema, `checkpoint.every` / `keep_last`, resume, the
    rule that a step with a non-finite loss is never saved, and the final `backbone.pt` export.

    It is given the parts it saves and nothing else (as torchtitan's `CheckpointManager`), so it
    knows no `trainer.run.Run`.

    Args:
        cfg: the run's config (`output`, `checkpoint.*`, and the model fields meta.json records).
        engine: the backbone's DeepSpeed engine.
        head, head_opt: this rank's Partial FC shard and its optimizer.
        loader: the training loader (epoch and global-sample position are saved and restored).
        rank, world: this process's rank and the world size.
        precision, zero_stage: the resolved engine settings, recorded in meta.json.
        log: rank 0's log line sink.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        engine: DeepSpeedEngine,
        head: PartialFC,
        head_opt: HeadOptimizer,
        loader: Any,  # epoch, set_epoch, state_dict, load_state_dict (any world size)
        rank: int,
        world: int,
        precision: str,
        zero_stage: int,
        log: Log = print,
    ) -> None:
        self.cfg = cfg
        self.engine, self.head, self.head_opt, self.loader = engine, head, head_opt, loader
        self.rank, self.world, self.log = rank, world, log
        self.precision, self.zero_stage = precision, zero_stage
        self.root = checkpoint_root(cfg.output)
        self.last_saved = latest_checkpoint(cfg.output)  # same on every rank (shared disk)

    def meta(self, step: int) -> Meta:
        """meta.json of a checkpoint at `step` (JSON-serializable; written last)."""
        cfg = self.cfg
        return {
            "step": step,
            "epoch": self.loader.epoch,
            "loader": self.loader.state_dict(),
            "world_size": self.world,
            "network": cfg.model.network,
            "embedding_size": cfg.model.embedding_size,
            "model_kwargs": cfg.model.kwargs,
            "num_classes": cfg.data.num_classes,
            "num_subcenters": cfg.head.num_subcenters,
            "precision": self.precision,
            "zero_stage": self.zero_stage,
            "config": to_dict(cfg),
        }

    def resume(self) -> int:
        """Restores the run from `checkpoint.resume`; returns the step to continue from (0 for a
        fresh start). Every rank must call it."""
        path = resolve_resume(self.cfg.checkpoint.resume, self.cfg.output, self.rank)
        if path is None:
            if not resume_off(self.cfg.checkpoint.resume):
                self.log(f"[checkpoint] no checkpoint in {self.root}: starting fresh")
            self.loader.set_epoch(0)
            return 0
        meta = load_meta(path)
        check_meta_fits(meta, self.cfg, path)
        self.loader.set_epoch(int(meta["epoch"]))
        try:  # global-sample offset, any world size; checked before the engine state is read
            self.loader.load_state_dict(meta["loader"])
        except ValueError as e:
            raise ConfigError(f"{path}/meta.json: 'loader' does not fit this data ({e})") from None
        meta = load_checkpoint(
            path, self.engine, self.head, self.head_opt, self.rank, self.world, self.log
        )
        self.log(f"[arcscale] resumed from {path} at step {meta['step']}, epoch {meta['epoch']}")
        return int(meta["step"])

    def save(self, step: int) -> None:
        """Writes `checkpoints/step_<step>/` (collective)."""
        save_checkpoint(
            self.cfg.output,
            step,
            self.engine,
            self.head,
            self.head_opt,
            self.meta(step),
            self.rank,
            self.cfg.checkpoint.keep_last,
            self.log,
        )
        self.last_saved = os.path.join(self.root, f"step_{step}")

    def maybe_save(self, step: int, finite: bool) -> None:
        """Saves every `checkpoint.every` steps, unless this step's loss was non-finite."""
        every = self.cfg.checkpoint.every
        if not every or step % every:
            return
        if not finite:
            self.log(f"[checkpoint] step {step}: not saved, the loss is non-finite")
            return
        self.save(step)

    def finish(self, step: int) -> None:
        """Saves the last step (if not saved yet) and exports its `backbone.pt` to the output
        folder, where arcface_torch users look for the final weights, with the same weights as
        `backbone.safetensors` beside it (no pickle; the header names the network)."""
        if self.last_saved is None or not self.last_saved.endswith(f"step_{step}"):
            self.save(step)
        if self.rank == 0:
            final = os.path.join(self.root, f"step_{step}", "backbone.pt")
            target = os.path.join(self.cfg.output, "backbone.pt")
            with atomic_path(target) as tmp:
                shutil.copyfile(final, tmp)
            export_safetensors(
                final, os.path.join(self.cfg.output, "backbone.safetensors"), self.meta(step)
            )


def export_safetensors(backbone_pt: str, target: str, meta: Meta) -> None:
    """`backbone_pt` (a consolidated state dict) rewritten as safetensors at `target`,
    atomically, with `meta`'s network, embedding size and builder kwargs in its header."""
    state = read_state_dict(Path(backbone_pt))
    with atomic_path(target) as tmp:
        save_safetensors(state, tmp, meta)


# What an arcscale run folder holds (docs/design.md): one of them marks a folder as a run's.
RUN_MARKERS = (
    "training.log",
    "config.yaml",
    "ds_config.json",
    "eval.jsonl",
    "checkpoints",
    "tensorboard",
    "backbone.pt",
)


def prepare_output_folder(output: str, overwrite: bool = False) -> None:
    """Create `output` and check that it is a folder a run may write into (every rank, before
    the run log is opened in it).

    Refused: an empty name, the filesystem root, a path that is (or lies under) a file, a name
    the filesystem cannot hold, a folder that cannot be written, and an existing non-empty folder
    holding none of `RUN_MARKERS` (somebody's data, not a run) unless `overwrite`.

    Raises:
        ConfigError: one line naming `output` and the reason.
    """
    if not output.strip():
        raise ConfigError("output: empty; name the run's folder (e.g. work_dirs/<config name>)")
    real = os.path.realpath(output)
    if os.path.dirname(real) == real:
        raise ConfigError(f"output: {output} is the filesystem root; name a folder for the run")
    if os.path.lexists(output) and not os.path.isdir(output):
        raise ConfigError(f"output: {output} exists and is not a folder")
    if os.path.isdir(output) and not overwrite:
        entries = sorted(os.listdir(output))
        if entries and not any(name in RUN_MARKERS for name in entries):
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ConfigError(
                f"output: {output} is not empty ({len(entries)} entries: {shown}) and holds no "
                "arcscale run; pick a new or empty folder, or set checkpoint.overwrite=true"
            )
    try:
        make_writable_folder(output)
    except OSError as e:
        raise ConfigError(f"output: cannot write to {output} ({e.strerror or e})") from None


def preflight_output(cfg: Config) -> None:
    """Start-up checks of the run folder, before any process group (every rank, shared disk).

    Raises:
        ConfigError: `output` refused by `prepare_output_folder`; an explicit
            `checkpoint.resume` path that is not a complete checkpoint; a fresh run
            (`checkpoint.resume=false`) in a folder holding another run's checkpoints without
            `checkpoint.overwrite=true`; a checkpoint to resume whose meta.json fails its schema
            or records other model/head sizes than the config (`verify.check_meta_fits`).
    """
    prepare_output_folder(cfg.output, cfg.checkpoint.overwrite)
    if resume_off(cfg.checkpoint.resume):
        prepare_fresh_output(cfg.output, cfg.checkpoint.overwrite)
    else:
        path = resolve_resume(cfg.checkpoint.resume, cfg.output)  # an explicit path must resolve
        if path is not None:  # before anything is allocated: sizes a resume cannot change
            check_meta_fits(load_meta(path), cfg, path)


def check_output_shared(output: str, rank: int, world: int, group: Any = None) -> None:
    """Every rank sees rank 0's output folder (collective; call once the process group exists).

    Checkpoints need one folder that all ranks share: rank 0 creates `step_N.tmp`, every rank
    writes its shards into it, and rank 0 consolidates the backbone from all ranks' ZeRO shards.
    On nodes with node-local output disks that fails at the first checkpoint; this check finds
    it at start-up instead. Rank 0 writes a token file named by a random string it broadcasts;
    each rank looks for it; the ranks agree on the result (all-reduce), so all raise together.

    Raises:
        ConfigError: a rank does not see the token (the message names the ranks and folder).
    """
    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return
    box: list[str | None] = [os.urandom(8).hex() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=group)
    token = os.path.join(output, f".arcscale_shared_{box[0]}")
    if rank == 0:
        os.makedirs(output, exist_ok=True)  # `train()` may be called without `main`'s checks
        with open(token, "w") as f:
            f.write("written by rank 0 at start-up; every rank must see this file\n")
    dist.barrier(group=group)
    seen = torch.zeros(world, dtype=torch.int64)
    seen[rank] = int(os.path.isfile(token))
    if dist.get_backend(group) == "nccl":
        seen = seen.cuda()
    dist.all_reduce(seen, group=group)
    dist.barrier(group=group)  # nobody removes the token while another rank still looks
    if rank == 0:
        os.remove(token)
    missing = [r for r, ok in enumerate(seen.tolist()) if not ok]
    if missing:
        raise ConfigError(
            f"output: {output} is not shared between the ranks: rank(s) "
            f"{', '.join(map(str, missing))} do not see the file rank 0 wrote there; put "
            "`output` on storage every node mounts at the same path (docs/reliability.md)"
        )

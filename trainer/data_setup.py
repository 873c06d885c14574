"""Builds the training dataset and loader from the config; checks data files before any
process-group work so that a bad path fails in one line (exit code 2)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from trainer.config import Config, ConfigError


def rec_paths(cfg: Config) -> tuple[str, str]:
    """(`train.rec`, `train.idx`) of `data.rec` (a folder, or the `.rec` file itself)."""
    rec = cfg.data.rec
    if os.path.isdir(rec):
        rec = os.path.join(rec, "train.rec")
    return rec, os.path.splitext(rec)[0] + ".idx"


def data_dir(cfg: Config) -> str:
    rec = cfg.data.rec
    return rec if os.path.isdir(rec) else os.path.dirname(rec)


IMAGE_SIZE = 112  # the backbones' input side (models/registry.py)


def val_bin_paths(cfg: Config) -> dict[str, str]:
    """`eval.val_targets` -> {name: path}: a name is `<data folder>/<name>.bin` (arcface_torch),
    anything with a `/` or ending in `.bin` is a path.

    Raises:
        ConfigError: two targets with the same name (`a/lfw.bin` and `b/lfw.bin`): their results
            would be logged under one name and one of them silently dropped.
    """
    out: dict[str, str] = {}
    for target in cfg.eval.val_targets:
        target = str(target)
        if target.endswith(".bin") or os.sep in target:
            name, path = os.path.splitext(os.path.basename(target))[0], target
        else:
            name, path = target, os.path.join(data_dir(cfg), f"{target}.bin")
        if name in out:
            raise ConfigError(
                f"eval.val_targets: '{out[name]}' and '{path}' have the same name '{name}'; "
                "rename one (results are logged by file name)"
            )
        out[name] = path
    return out


def _check_val_bins(cfg: Config) -> None:
    """Each `.bin` exists, parses (restricted unpickler, no image decode) and has at least as
    many pairs as the evaluation has folds, so it cannot fail at the first evaluation."""
    from data.verification_bin import read_bin_raw
    from evaluation.verification import NROF_FOLDS

    folds = NROF_FOLDS  # the callback's (evaluation/callback.py)
    for name, path in val_bin_paths(cfg).items():
        if not os.path.isfile(path):
            raise ConfigError(f"eval.val_targets: '{name}': file not found: {path}")
        try:
            _, issame = read_bin_raw(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"eval.val_targets: '{name}': {e}") from None
        if len(issame) < folds:
            raise ConfigError(
                f"eval.val_targets: '{name}': {path} holds {len(issame)} pairs, the "
                f"{folds}-fold evaluation needs at least {folds}"
            )


def preflight(cfg: Config) -> None:
    """Checks files and dataset metadata named by the config.

    Raises:
        ConfigError: a missing `.rec`/`.idx`/folder, a garbage `property` file, a
            `data.num_classes` that disagrees with it, or an evaluation `.bin` that is missing,
            unreadable, has fewer pairs than folds or shares its name with another.
    """
    if cfg.data.kind == "rec":
        rec, idx = rec_paths(cfg)
        for path in (rec, idx):
            if not os.path.isfile(path):
                raise ConfigError(f"data.rec: file not found: {path}")
        prop = os.path.join(os.path.dirname(rec), "property")
        if os.path.isfile(prop):
            from data.recordio import RecordIOError, read_property

            try:
                num_classes = read_property(prop)[0]
            except RecordIOError as e:
                raise ConfigError(f"data.rec: {e}") from None
            if num_classes != cfg.data.num_classes:
                raise ConfigError(
                    f"data.num_classes: config says {cfg.data.num_classes} but {prop} says "
                    f"{num_classes}"
                )
    elif cfg.data.kind == "folder" and not os.path.isdir(cfg.data.rec):
        raise ConfigError(f"data.rec: image folder not found: {cfg.data.rec}")
    _check_val_bins(cfg)


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


AUTO_WORKERS_MAX = 16  # per rank: past this the main process, not decode, limits the rate


def resolve_num_workers(
    setting: int | str, env: Mapping[str, str] | None = None, cpus: int | None = None
) -> int:
    """Loader workers per rank for `data.num_workers` (DALI: its CPU threads).

    Args:
        setting: an int >= 0 (used as given) or "auto".
        env: launcher variables (default `os.environ`): the ranks on this host are
            `LOCAL_WORLD_SIZE` (torchrun, Accelerate) or `LOCAL_SIZE` (the DeepSpeed launcher),
            1 when neither is set.
        cpus: usable CPUs (default: this process' CPU affinity, which follows `taskset`, Slurm
            and container CPU sets).

    Returns:
        "auto": `cpus // local ranks - 1` (each rank's own process keeps a core for the step
        loop and the collation), between 0 and `AUTO_WORKERS_MAX`. One worker decodes about
        3,900 112x112 JPEGs/s (33 ms per 128 on one core, docs/benchmarks.md).
    """
    if setting != "auto":
        return int(setting)
    env = os.environ if env is None else env
    local = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or 1)
    if cpus is None:
        affinity = getattr(os, "sched_getaffinity", None)
        cpus = len(affinity(0)) if affinity is not None else os.cpu_count() or 1
    return max(0, min(AUTO_WORKERS_MAX, cpus // max(1, local) - 1))


def _barrier() -> Callable[[], Any] | None:
    """`torch.distributed.barrier` when a process group with several ranks is up, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.barrier
    return None


def build_dataset(cfg: Config) -> Any:
    """The map-style dataset of `data.kind` (uint8 HWC RGB images, int labels).

    A `.rec` index is parsed once per node by local rank 0 into numpy arrays (8 B/image) that
    the other ranks memory-map behind a barrier (`data.image_index.shared_image_index`); the
    DALI loader reads through the same index, so no second copy is built when `data.dali` is on.

    Raises:
        ConfigError: an unreadable dataset (bad/empty index, lying header record, non-image
            file in a folder), labels that do not fit `data.num_classes` (a `.rec` is scanned at
            up to 10k evenly spaced keys; a bad label past those stops the run at first sight)
            or images that are not 112x112 (1000 sampled; past those, a wrong size is a corrupt
            record: it stops the run or `data.skip_corrupt` skips it).
    """
    from data.datasets import ImageFolderDataset, RecordDataset, SyntheticDataset

    if cfg.data.kind == "synthetic":
        return SyntheticDataset(cfg.data.num_image, cfg.data.num_classes, seed=cfg.seed)
    if cfg.data.kind == "folder":
        try:  # a non-image file, a stray file at the top, an empty identity folder
            ds: Any = ImageFolderDataset(cfg.data.rec, image_size=IMAGE_SIZE)
        except (OSError, ValueError) as e:
            raise ConfigError(f"data.rec: {e}") from None
    else:
        from data.image_index import shared_image_index

        rec, idx = rec_paths(cfg)
        try:  # a cut-short .rec, a bad or empty .idx, a header record that lies
            index = shared_image_index(rec, idx, None, _local_rank(), _barrier())
            ds = RecordDataset(
                rec, idx, num_classes=cfg.data.num_classes, image_size=IMAGE_SIZE, index=index
            )
        except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: local rank 0 failed
            raise ConfigError(f"data.rec: {e}") from None
        try:
            ds.scan_labels(10_000)
        except ValueError as e:
            raise ConfigError(f"data.num_classes={cfg.data.num_classes}: {e}") from None
    _check_sizes(ds)
    if ds.num_classes > cfg.data.num_classes:
        raise ConfigError(
            f"data.num_classes: {cfg.data.rec} has {ds.num_classes} classes, config says "
            f"{cfg.data.num_classes}"
        )
    return ds


def _check_sizes(ds: Any) -> None:
    from data.datasets import scan_image_sizes

    try:
        scan_image_sizes(ds, IMAGE_SIZE, 1000)
    except ValueError as e:
        raise ConfigError(f"data.rec: {e} (crop/resize it, e.g. tools/folder2rec.py)") from None


def build_loader(cfg: Config, dataset: Any, rank: int, world_size: int, device: Any) -> Any:
    """DALI on a GPU when `data.dali` is set (RecordIO only), the CPU loader otherwise; both draw
    the same per-epoch global permutation (`data.sampler`) from the dataset's index."""
    if cfg.data.dali and device.type == "cuda":
        if cfg.data.kind != "rec":
            raise ConfigError("data.dali: DALI reads RecordIO only (data.kind=rec)")
        if cfg.data.skip_corrupt:
            raise ConfigError("data.skip_corrupt: not supported by the DALI loader (data.dali)")
        from data.dali_loader import build_dali_loader

        rec, idx = rec_paths(cfg)
        return build_dali_loader(
            rec,
            idx,
            cfg.data.batch_size,
            rank,
            world_size,
            cfg.seed,
            device_id=device.index or 0,
            num_threads=resolve_num_workers(cfg.data.num_workers),  # 0 is taken as 1 thread
            flip=cfg.data.flip,
            index=getattr(dataset, "index", None),  # the dataset's shared index, not a new one
            local_rank=_local_rank(),
            barrier=_barrier(),
            augment=cfg.data.augment,
        )
    from data.loader import build_cpu_loader

    workers = resolve_num_workers(cfg.data.num_workers)
    return build_cpu_loader(
        dataset,
        cfg.data.batch_size,
        rank,
        world_size,
        cfg.seed,
        num_workers=workers,
        flip=cfg.data.flip,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
        skip_corrupt=cfg.data.skip_corrupt,
        augment=cfg.data.augment,
    )

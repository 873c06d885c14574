"""The typed schema of an experiment: frozen dataclasses, their defaults and field docs.

Names follow insightface's arcface_torch (`configs/base.py`) where a user would look for them
(`network`, `embedding_size`, `sample_rate`, `margin_list`, `batch_size` per device,
`gradient_acc`, `num_classes`, `num_image`, `num_epoch`, `warmup_epoch`, `val_targets`,
`frequent`, `verbose`, `seed`).

This is the bottom of the package: it imports no other module of `trainer.config`, and every
other module (loading, validation, factories) reads these types. `ConfigError` lives here so
that each layer can raise it; `COMPAT_PRESETS` lives here because it is part of what the
`compat` field means (loading applies it, validation checks the name against it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from data.augment import AugmentSpec


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class ModelConfig:
    """Backbone. `network` is a name from `models.list_models()`; `kwargs` go to its builder.

    Fine-tuning (docs/finetune.md, trainer/pretrained.py): `pretrained` starts the backbone from
    a `backbone.pt` of ours, a step or run dir, or an arcface_torch `backbone.pth`; the head
    starts fresh. Key mismatches are an error unless `pretrained_strict: false` (logged, the
    matching keys load). `freeze_bn` keeps every BatchNorm's running statistics as loaded.
    `freeze_stages` N > 0 freezes the stem and the first N stages for `freeze_steps` optimizer
    steps (0: the whole run)."""

    network: str = "r50"
    embedding_size: int = 512
    grad_checkpointing: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: str = ""
    pretrained_strict: bool = True
    freeze_bn: bool = False
    freeze_stages: int = 0
    freeze_steps: int = 0


@dataclass(frozen=True)
class DataConfig:
    """Training data. `kind`: `rec` (insightface `train.rec/.idx` in folder `rec`), `folder`
    (one sub-folder per identity under `rec`) or `synthetic` (random images, no files).
    `batch_size` is the micro-batch per device; `num_image`/`num_classes` as arcface_torch."""

    kind: str = "rec"
    rec: str = ""
    num_classes: int = 0
    num_image: int = 0
    batch_size: int = 128
    # Loader workers per rank (DALI: CPU threads); "auto" = this host's usable CPUs / local
    # ranks - 1, at most 16 (trainer.data_setup.resolve_num_workers, docs/benchmarks.md).
    num_workers: Any = "auto"  # an int >= 0 or "auto" (checked in validate.py)
    dali: bool = False
    flip: bool = True
    skip_corrupt: bool = False
    # Opt-in augmentation (data/augment.py, docs/data.md), the same in the CPU and DALI loaders.
    augment: AugmentSpec = field(default_factory=AugmentSpec)


@dataclass(frozen=True)
class HeadConfig:
    """Partial FC head and its margin `cos(m1*theta + m2) - m3`, scale `s`."""

    sample_rate: float = 1.0
    margin_list: tuple[float, ...] = (1.0, 0.5, 0.0)
    scale: float = 64.0
    interclass_filtering_threshold: float = 0.0
    # GEMM precision of the logits: fp32, tf32, bf16 (bf16 operands, fp32 accumulation and
    # softmax); auto = bf16 on CUDA under bf16 training, tf32 on other CUDA runs, fp32 on CPU.
    logits_dtype: str = "auto"
    # Row passes of the head step: compiled (torch.compile kernels, heads/fused.py) or eager;
    # auto = compiled on CUDA only (on CPU the compile costs more than a short run saves).
    kernels: str = "auto"
    # Margin loss by name (`heads.LOSSES`, docs/losses.md): combined reads margin_list;
    # the others take their own arguments from loss_kwargs (e.g. {m: 0.4, h: 0.333}).
    loss: str = "combined"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    # issue #15 fidelity switches: exact = the margin's own slope at the target (ours);
    # arcface_torch = slope s, as its no_grad edit of the target logit.
    margin_gradient: str = "exact"
    # none (ours) or arcface_torch: cosines clamped to [-1, 1], target probability at 1e-30.
    clamping: str = "none"
    # Sub-center ArcFace (Deng et al., ECCV 2020): K centers per class, a class's cosine is the
    # max over its K; composes with any loss (docs/losses.md). 1 = one center per class.
    num_subcenters: int = 1


@dataclass(frozen=True)
class OptimConfig:
    """One optimizer recipe for backbone and head. arcface_torch: SGD lr 0.1 momentum 0.9
    wd 5e-4 for ResNets, AdamW lr 1e-3 wd 0.1 for ViTs. `clip_grad` is DeepSpeed's
    `gradient_clipping` of the backbone (0 disables)."""

    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    gradient_acc: int = 1
    clip_grad: float = 5.0
    # Head rows' weight decay and momentum: "sampled" rows only (arcscale), or "dense", every
    # row of the shard every step as arcface_torch's SGD does (SGD only; heads/lazy_decay.py).
    head_decay: str = "sampled"
    # Fine-tuning: the backbone's learning rate is `lr * backbone_lr_scale` (the head's is `lr`);
    # the first `head_warmup_steps` steps train the head only (backbone frozen).
    backbone_lr_scale: float = 1.0
    head_warmup_steps: int = 0


@dataclass(frozen=True)
class ScheduleConfig:
    """Polynomial decay after linear warmup, per step (trainer/lr.py). `power` 2 is arcface_torch's
    older `PolyScheduler`; its current `PolynomialLRWarmup` decays linearly (power 1, what
    `compat: arcface_torch` sets). `max_steps` > 0 overrides the count derived from `num_epoch`."""

    num_epoch: int = 20
    warmup_epoch: int = 0
    max_steps: int = 0
    power: float = 2.0


# Why `engine.compile` refuses ZeRO-3 (validate.py at load, trainer/engine.py once the stage
# is resolved from the launch config or the JSON).
COMPILE_ZERO3 = (
    "is ZeRO-1/2 only: under ZeRO-3 every module's parameter fetch/release hook breaks the "
    "compiled graph (DeepSpeed's DeepCompile is not supported here); set engine.compile=false "
    "or a ZeRO stage below 3"
)


@dataclass(frozen=True)
class EngineConfig:
    """DeepSpeed engine. `zero_stage` (-1: from the Accelerate launch config or the JSON),
    `precision` fp32/fp16/bf16 ("": same fallbacks), `ds_config` a JSON in `ds_configs/` whose
    "auto" fields are filled from this config ("": the Accelerate config's
    `deepspeed_config_file`, else the stage's default). `offload` moves optimizer state (and
    ZeRO-3 parameters) to CPU. `timeout_s` bounds every collective; `max_bad_steps` consecutive
    non-finite losses stop the run. `sync_bn` normalizes BatchNorm layers with the statistics of
    the global batch (trainer/sync_bn.py), so the loss does not depend on how it is split over
    ranks: a run resumed on another world size continues the same loss curve. `memory_format`
    of the input batches: `channels_last` (faster CPU convolutions), `contiguous` (NCHW) or
    `auto` (channels_last, except where a oneDNN bug needs NCHW: trainer/memory_format.py).
    `compile` runs the backbone through `torch.compile` (DeepSpeed's `engine.compile`, the
    accelerator's backend: inductor) to fuse BatchNorm, PReLU and residual adds; ZeRO-1/2 only."""

    zero_stage: int = -1
    precision: str = ""
    ds_config: str = ""
    offload: bool = False
    timeout_s: int = 1800
    max_bad_steps: int = 20
    sync_bn: bool = False
    memory_format: str = "auto"
    compile: bool = False


@dataclass(frozen=True)
class LoggingConfig:
    """Console line and TensorBoard scalars every `frequent` optimizer steps (rank 0); the
    console is also kept in `<output>/training.log`. `trackers`: Accelerate's `log_with` (e.g.
    `[wandb]`, `[mlflow]`; the package must be installed), started by
    `accelerator.init_trackers(project, config, init_kwargs)` and sent the step scalars and the
    verification metrics (docs/data.md). `project` is the tracker's project/experiment;
    `run_name` ("": the output folder's name) and `tags` go to the trackers that take them
    (wandb, mlflow); `init_kwargs`: tracker name -> keyword arguments of its start (wins over
    the above), e.g. `{wandb: {mode: offline, entity: team}}`."""

    frequent: int = 10
    tensorboard: bool = True
    progress_bar: bool = True
    trackers: tuple[str, ...] = ()
    project: str = "arcscale"
    run_name: str = ""
    tags: tuple[str, ...] = ()
    init_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalConfig:
    """Verification every `verbose` steps and at the end on `val_targets`: names of `<name>.bin`
    in `data.rec` (as arcface_torch) or paths to `.bin` files."""

    val_targets: tuple[str, ...] = ()
    verbose: int = 2000
    batch_size: int = 64


@dataclass(frozen=True)
class CheckpointConfig:
    """`every` optimizer steps (0: only at the end); `keep_last` complete checkpoints kept;
    `resume`: false, true (latest in `output`) or a checkpoint directory path; `overwrite`: a
    fresh run may replace the checkpoints another run left in `output` (else it refuses)."""

    every: int = 0
    keep_last: int = 3
    resume: Any = False
    overwrite: bool = False


@dataclass(frozen=True)
class PreemptionConfig:
    """Stopping on a signal without losing a step (trainer/signals.py, docs/clusters.md): on one
    of `signals` every rank finishes its step, the ranks agree on the stop step every
    `sync_every` optimizer steps (one 8-byte all-reduce), the run checkpoints that step and
    exits 128 + the signal number. `requeue`: then `scontrol requeue $SLURM_JOB_ID` (rank 0).
    `signals: []` keeps the default actions (a signal kills the run)."""

    signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGINT")
    sync_every: int = 10
    requeue: bool = False


@dataclass(frozen=True)
class ElasticConfig:
    """A resume on another world size than the checkpoint's (elastic restart, requeue on another
    allocation; trainer/elastic.py): `on_resize` keep_global_batch (gradient accumulation keeps
    the checkpoint's global batch), scale_lr (LR scaled with the global batch) or none (as
    configured)."""

    on_resize: str = "keep_global_batch"


@dataclass(frozen=True)
class Config:
    """A whole experiment. `output` is the run directory (checkpoints, TensorBoard, eval.jsonl);
    a config file that sets none gets `work_dirs/<its name>`, as arcface_torch (`load_config`)."""

    output: str = "work_dirs/run"
    seed: int = 2048
    # "arcface_torch": every switch where arcscale departs from arcface_torch's math takes
    # arcface_torch's value (COMPAT_PRESETS), unless the file or command line sets that field.
    compat: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)


# `compat: NAME` -> the fields it sets (dotted key -> value) where the config does not set them.
COMPAT_PRESETS: dict[str, dict[str, Any]] = {
    "arcface_torch": {
        "schedule.power": 1.0,  # PolynomialLRWarmup's default power (train_v2.py)
        "optim.head_decay": "dense",  # SGD over the whole weight Parameter (partial_fc_v2.py)
        "head.margin_gradient": "arcface_torch",  # margin edited under no_grad
        "head.clamping": "arcface_torch",  # cosines to [-1, 1], probabilities at 1e-30
    },
}

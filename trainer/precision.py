"""The engine precisions by name and their torch dtypes (``engine.precision``; DeepSpeed's
``fp16``/``bf16`` sections). A leaf module: the memory planner reads the sizes without pulling in
the engine."""

from __future__ import annotations

import torch

# Name -> parameter/activation dtype of the backbone under that precision.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

"""``model_card.md``: a short card written beside an ONNX export (what, trained on, numbers, use).

Built from the model's ``metadata_props`` (``evaluation/onnx_meta.py``), the run's
``config.yaml`` when the weights came from a run (read as plain YAML: data, loss, schedule), the
run's last held-out verification (``eval.jsonl``, written by the training callback) and, when
variants were measured, their table (``evaluation/deploy.py``).
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["find_run_dir", "model_card"]


def find_run_dir(weights: str) -> str | None:
    """The run folder above a weights file (``RUN/backbone.pt`` or
    ``RUN/checkpoints/step_N/backbone.pt``): the first of them holding ``config.yaml``."""
    here = os.path.dirname(os.path.abspath(weights))
    for cand in (here, os.path.dirname(os.path.dirname(here))):
        if os.path.isfile(os.path.join(cand, "config.yaml")):
            return cand
    return None


def _config_lines(run_dir: str) -> list[str]:
    import yaml

    with open(os.path.join(run_dir, "config.yaml")) as f:
        cfg = yaml.safe_load(f) or {}
    data, head, sched = cfg.get("data", {}), cfg.get("head", {}), cfg.get("schedule", {})
    return [
        f"- data: `{data.get('rec')}` ({data.get('num_classes')} identities, "
        f"{data.get('num_image')} images), batch {data.get('batch_size')} per rank",
        f"- loss: `{head.get('loss')}` margins {head.get('margin_list')} scale "
        f"{head.get('scale')}, Partial FC sample rate {head.get('sample_rate')}",
        f"- schedule: {sched.get('num_epoch')} epochs (max_steps {sched.get('max_steps')}), "
        f"optimizer {cfg.get('optim', {}).get('optimizer')} lr {cfg.get('optim', {}).get('lr')}",
    ]


def _heldout_lines(run_dir: str) -> list[str]:
    path = os.path.join(run_dir, "eval.jsonl")
    if not os.path.isfile(path):
        return ["- no verification during training (`eval.jsonl` absent)"]
    last: dict[str, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                last[rec["target"]] = rec
    return [
        f"- `{t}` at step {r['step']}: accuracy (flip) {100 * r['accuracy_mean']:.2f} +- "
        f"{100 * r['accuracy_std']:.2f} %, TAR@FAR={r['far_target']:g} "
        f"{100 * r['tar_at_far']:.1f} % ({r['num_pairs']} pairs)"
        for t, r in last.items()
    ]


def model_card(meta: dict[str, str], run_dir: str | None, table: list[str] | None = None) -> str:
    """The card's Markdown text.

    Args:
        meta: the fp32 export's metadata.
        run_dir: the training run's folder (None: weights from elsewhere, e.g. arcface_torch).
        table: ``evaluation.deploy.format_table`` lines of the measured variants, if any.
    """
    lines = [
        f"# {meta.get('network')} face embedding model (arcscale {meta.get('arcscale_version')})",
        "",
        f"- network `{meta.get('network')}` {meta.get('model_kwargs')}, embedding size "
        f"{meta.get('embedding_size')}, training config sha256 `{meta.get('config_sha256')}`",
        f"- input: aligned face crop {meta.get('input_size')} ({meta.get('input_layout')}, "
        f"{meta.get('channel_order')}), float32 `(pixel - mean) / std` per channel, mean "
        f"`{meta.get('mean')}`, std `{meta.get('std')}`; output (N, D) float32, not normalized",
        f"- flip test `{meta.get('flip_test')}`: add the embedding of the mirrored crop, then "
        "L2-normalize; compare faces by cosine similarity",
        "",
        "## Trained on",
        "",
    ]
    lines += _config_lines(run_dir) if run_dir else ["- not from an arcscale run: unknown"]
    lines += ["", "## Held-out numbers", ""]
    lines += _heldout_lines(run_dir) if run_dir else ["- none recorded"]
    if table:
        lines += ["", "## Variants (fp32 / fp16 / INT8, measured by the export)", "", *table]
    lines += [
        "",
        "## Intended use",
        "",
        "Face verification and identification between crops aligned to the ArcFace 5-point "
        "template (`tools/align_faces.py`). Accuracy holds only for the data distribution it "
        "was trained on; measure it on your own held-out pairs (`tools/eval_verification.py`) "
        "before relying on a threshold. Not for decisions about people without human review.",
        "",
    ]
    return "\n".join(lines)

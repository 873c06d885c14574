"""Score a face-recognition backbone on verification ``.bin`` sets (insightface protocol).

    python tools/eval_verification.py --model backbone.onnx --bin work_dirs/lfw_demo/lfw_heldout.bin
    python tools/eval_verification.py --model work_dirs/run/backbone.pt --network mbf --bin ...
    python tools/eval_verification.py --untrained --network mbf --bin ...   # random-init baseline

The model is an ONNX file (fp32, fp16 or INT8, run with onnxruntime on CPU; the normalization its
metadata declares is applied, and a ``--network`` it contradicts is refused, exit 2), PyTorch
weights (``backbone.pt``, ``backbone.safetensors``, arcface_torch ``backbone.pth``/``model.pt``)
or a folder holding them, a checkpoint folder (loaded by ``models.weights.load_backbone``), or
with ``--untrained`` a freshly initialized network of the registry. Prints XNorm, flip-test
accuracy (mean+-std over 10 folds) and TAR@FAR per target; writes ``results.json`` and
``roc.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from data.atomic import write_text_atomic
from data.verification_bin import load_bin
from evaluation.embedders import (
    Embedder,
    build_untrained,
    check_input_size,
    embed_views,
    load_embedder,
    torch_embedder,
)
from evaluation.verification import evaluate_views, format_results, plot_roc


def untrained_spec(args: argparse.Namespace) -> tuple[str, int, dict]:
    """(network, embedding size, builder kwargs) for ``--untrained``: from ``--config`` (a training
    config such as a run's ``config.yaml``, so the baseline is the same kind of network) with
    ``--network``/``--embedding-size`` taking precedence when given."""
    if not args.config:
        return args.network, args.embedding_size or 512, {}
    from trainer.config import load_config

    cfg = load_config(args.config)
    network = args.network or cfg.model.network
    kwargs = dict(cfg.model.kwargs) if network == cfg.model.network else {}
    return network, args.embedding_size or cfg.model.embedding_size, kwargs


def make_embedder(args: argparse.Namespace) -> Embedder:
    """The model named on the command line (``evaluation.embedders``), or the untrained baseline."""
    if args.untrained:
        network, embedding_size, kwargs = untrained_spec(args)
        model = build_untrained(network, embedding_size, args.seed, kwargs)
        desc = f"untrained {network} {kwargs or ''} (seed {args.seed})".replace("  ", " ")
        return torch_embedder(model, args.device, args.batch_size, desc)
    return load_embedder(args.model, args.network, args.device, args.batch_size)


def target_name(path: str) -> str:
    """``work_dirs/lfw_demo/lfw_heldout.bin`` -> ``lfw_heldout``."""
    return os.path.splitext(os.path.basename(path))[0]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", help="*.onnx, backbone.pt/.safetensors/.pth, model.pt, or a run/step folder"
    )
    p.add_argument(
        "--network", default=None, help="backbone name (mbf, r50, ...) for .pt/--untrained"
    )
    p.add_argument("--untrained", action="store_true", help="score a random-init --network")
    p.add_argument("--bin", action="append", required=True, help="verification .bin (repeatable)")
    p.add_argument("--out", default="work_dirs/eval", help="folder for results.json and roc.png")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--nfolds", type=int, default=10)
    p.add_argument("--far-target", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="init seed for --untrained")
    p.add_argument("--embedding-size", type=int, default=None, help="D for --untrained (512)")
    p.add_argument(
        "--config", default=None, help="training config for --untrained (network, D, kwargs)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.untrained == bool(args.model):
        p.error("give exactly one of --model and --untrained")
    if args.untrained and not (args.network or args.config):
        p.error("--untrained needs --network or --config")
    names = [target_name(b) for b in args.bin]
    if len(set(names)) != len(names):
        p.error(f"--bin targets must have distinct file names, got {names}")
    if not 0.0 < args.far_target < 1.0:
        _fail(f"--far-target must be in (0, 1), got {args.far_target}")
    if args.nfolds < 2:
        _fail(f"--nfolds must be >= 2, got {args.nfolds}")
    if args.batch_size < 1:
        _fail(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _fail(message: str):
    """One stderr line and exit status 2 (bad input), no traceback."""
    print(f"eval_verification: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def main(argv=None) -> dict[str, dict]:
    """Run the evaluation; returns target name -> metrics (without ROC arrays).

    Bad input (missing or unreadable model or .bin, a .bin with fewer pairs than --nfolds, an
    ONNX model whose input size does not fit the images, an unwritable --out) prints one line
    ``eval_verification: error: ...`` and exits 2.
    """
    args = parse_args(argv)
    try:
        return _evaluate(args)
    except (OSError, ValueError, KeyError, TypeError) as e:
        _fail(_first_line(e))


def _evaluate(args: argparse.Namespace) -> dict[str, dict]:
    embedder = make_embedder(args)
    desc = embedder.description
    print(f"model: {desc}")
    results, summary = {}, {}
    for path in args.bin:
        name = target_name(path)
        images, issame = load_bin(path)
        if len(issame) < args.nfolds:
            raise ValueError(
                f"{path} holds {len(issame)} pairs, fewer than the {args.nfolds} folds (--nfolds)"
            )
        check_input_size(embedder, images.shape[1], images.shape[2], path)
        t0 = time.perf_counter()
        plain, flipped = embed_views(embedder, np.asarray(images), embedder.batch_size)
        res = evaluate_views(
            plain, flipped, np.asarray(issame), nrof_folds=args.nfolds, far_target=args.far_target
        )
        res["time_s"] = time.perf_counter() - t0
        for line in format_results(name, None, res):
            print(line)
        results[name] = res
        summary[name] = {k: v for k, v in res.items() if k != "roc"}
    os.makedirs(args.out, exist_ok=True)
    plot_roc(results, os.path.join(args.out, "roc.png"), title=f"ROC: {os.path.basename(desc)}")
    text = json.dumps({"model": desc, "targets": summary}, indent=2)
    write_text_atomic(os.path.join(args.out, "results.json"), text)
    print(f"wrote {args.out}/results.json and roc.png")
    return summary


def cli() -> int:
    """Console entry (`arcscale-eval-verification`): exit status 0; errors exit 2 inside `main`."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(cli())

"""Score a face-recognition backbone on verification ``.bin`` sets (insightface protocol).

    python tools/eval_verification.py --model backbone.onnx --bin work_dirs/lfw_demo/lfw_heldout.bin
    python tools/eval_verification.py --model work_dirs/run/backbone.pt --network mbf --bin ...
    python tools/eval_verification.py --untrained --network mbf --bin ...   # random-init baseline

The model is an ONNX file (run with onnxruntime on CPU), PyTorch weights or a checkpoint folder
(loaded by ``trainer.saved_backbone.load_backbone``), or with ``--untrained`` a freshly initialized
network of the registry. Prints XNorm, flip-test accuracy (mean+-std over 10 folds) and TAR@FAR per
target; writes ``results.json`` and ``roc.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from data.atomic import write_text_atomic
from data.verification_bin import load_bin
from trainer.verification import embed_views, evaluate_views, format_results, plot_roc

EmbedFn = Callable[[torch.Tensor], torch.Tensor]


def onnx_embedder(path: str, batch_size: int) -> tuple[EmbedFn, int, bool]:
    """onnxruntime (CPU) session as an embed function.

    Returns:
        ``(embed_fn, batch_size, fixed)``: a model exported with a fixed batch dimension forces
        that batch size, and ``fixed`` asks the caller to pad the last batch.
    """
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's errors (InvalidProtobuf, Fail...) share no base class
        raise ValueError(f"--model {path}: onnxruntime cannot load it: {_first_line(e)}") from None
    inp = sess.get_inputs()[0]
    fixed = isinstance(inp.shape[0], int) and inp.shape[0] > 0
    if fixed:
        batch_size = inp.shape[0]

    def embed(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, {inp.name: np.ascontiguousarray(x.numpy())})[0])

    embed.input_shape = list(inp.shape)  # for check_input_size
    return embed, batch_size, fixed


def check_input_size(embed_fn: EmbedFn, images: np.ndarray, model: str, bin_path: str) -> None:
    """An ONNX model with a fixed (C, H, W) must fit the .bin's images (N, H, W, 3).

    Raises:
        ValueError: naming the model's input shape and the images' size.
    """
    shape = getattr(embed_fn, "input_shape", None)
    if shape is None or len(shape) != 4:
        return
    want = (3, images.shape[1], images.shape[2])
    if any(isinstance(d, int) and d > 0 and d != w for d, w in zip(shape[1:], want)):
        raise ValueError(
            f"--model {model} takes input {shape} but {bin_path} holds "
            f"{images.shape[2]}x{images.shape[1]} images, i.e. (N, 3, {want[1]}, {want[2]})"
        )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def torch_embedder(model: torch.nn.Module, device: str) -> EmbedFn:
    """A backbone in eval mode on ``device`` as an embed function."""
    model = model.to(device).eval()

    def embed(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(device))

    return embed


def build_untrained(
    network: str, embedding_size: int, seed: int, model_kwargs: dict | None = None
) -> torch.nn.Module:
    """Randomly initialized backbone ``network`` from the ``models`` registry (seeded).

    Raises:
        models.UnknownModelError: ``network`` is not registered.
    """
    import models

    torch.manual_seed(seed)
    return models.create(network, embedding_size=embedding_size, **(model_kwargs or {}))


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


def make_embedder(args: argparse.Namespace) -> tuple[EmbedFn, int, bool, str]:
    """Embed function, batch size, pad flag and a description of the model, from the CLI."""
    if args.untrained:
        network, embedding_size, kwargs = untrained_spec(args)
        model = build_untrained(network, embedding_size, args.seed, kwargs)
        return (
            torch_embedder(model, args.device),
            args.batch_size,
            False,
            f"untrained {network} {kwargs or ''} (seed {args.seed})".replace("  ", " "),
        )
    if not os.path.exists(args.model):
        raise FileNotFoundError(f"--model: no such file or folder {args.model}")
    if args.model.endswith(".onnx"):
        fn, bs, fixed = onnx_embedder(args.model, args.batch_size)
        return fn, bs, fixed, args.model
    from trainer.saved_backbone import load_backbone  # heavy (models, checkpoints): lazy

    model = load_backbone(args.model, args.network)
    return torch_embedder(model, args.device), args.batch_size, False, args.model


def target_name(path: str) -> str:
    """``work_dirs/lfw_demo/lfw_heldout.bin`` -> ``lfw_heldout``."""
    return os.path.splitext(os.path.basename(path))[0]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="backbone.onnx, backbone.pt or a checkpoint folder")
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
    embed_fn, batch_size, pad, desc = make_embedder(args)
    print(f"model: {desc}")
    results, summary = {}, {}
    for path in args.bin:
        name = target_name(path)
        images, issame = load_bin(path)
        if len(issame) < args.nfolds:
            raise ValueError(
                f"{path} holds {len(issame)} pairs, fewer than the {args.nfolds} folds (--nfolds)"
            )
        check_input_size(embed_fn, images, args.model, path)
        t0 = time.perf_counter()
        plain, flipped = embed_views(embed_fn, np.asarray(images), batch_size, pad_to_batch=pad)
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


if __name__ == "__main__":
    main()

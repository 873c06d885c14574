"""Embed aligned 112x112 faces with a trained model, or compare two faces.

    python tools/embed.py MODEL IMAGES --out DIR [--list] [--no-flip] [--raw] [--batch-size 64]
        [--network NAME --embedding-size D] [--no-progress]
    python tools/embed.py MODEL --compare A.jpg B.jpg [--results results.json [--target NAME]
        | --threshold COS]

MODEL is anything ``evaluation/embedders.py`` loads: a run directory, a step directory, a
``backbone.pt`` or ``backbone.safetensors``, an arcface_torch ``backbone.pth`` or ``model.pt`` (or
its folder; with ``--network``, and ``--embedding-size`` when not 512) or an ``.onnx`` file (fp32,
fp16 or INT8: its metadata's normalization is applied; a contradicting ``--network`` or
``--embedding-size`` is refused, exit 2). IMAGES is a folder (every image file below it, sorted) or,
with ``--list``, a text file of image paths (one a line, relative to the file's folder). Faces
must be aligned 112x112 crops (``tools/align_faces.py``). Each embedding is the model's output
plus that of the mirrored image (the flip test of insightface's evaluation; ``--no-flip``: the
image only), L2-normalized unless ``--raw``, so a dot product is the cosine similarity.

Outputs in ``--out``: ``embeddings.npy`` (N, D) float32, ``index.tsv`` (``row<TAB>path``, the
row of each image) and ``skipped.tsv`` (``path<TAB>reason``: missing, unreadable or not 112x112;
never silently dropped), all written atomically.

``--compare`` prints the cosine similarity of two faces and, given a threshold, "same" or
"different". ``--results`` takes it from a verification result (``tools/eval_verification.py``'s
or the demo's ``results.json``): its ``best_threshold`` is the squared distance ``t`` between
normalized embeddings that separates the pairs best, i.e. the cosine ``1 - t / 2``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from data.atomic import atomic_path, write_text_atomic
from data.datasets import IMAGE_EXTENSIONS
from data.decode import decode_image
from data.face_jpeg import progress_bar

if TYPE_CHECKING:
    from evaluation.embedders import Embedder

SIZE = 112


def list_images(source: str, is_list: bool) -> list[str]:
    """The image paths of a folder (recursive, sorted) or of a list file.

    Raises:
        FileNotFoundError: ``source`` missing. ValueError: no image in it.
    """
    if is_list:
        if not os.path.isfile(source):
            raise FileNotFoundError(f"{source}: image list not found")
        base = os.path.dirname(os.path.abspath(source))
        with open(source, encoding="utf-8") as f:
            paths = [os.path.join(base, line.strip()) for line in f if line.strip()]
    else:
        if not os.path.isdir(source):
            raise FileNotFoundError(f"{source}: image folder not found (a list file needs --list)")
        paths = []
        for folder, dirs, files in os.walk(source):
            dirs.sort()
            paths += [
                os.path.join(folder, n)
                for n in sorted(files)
                if n.lower().endswith(IMAGE_EXTENSIONS)
            ]
    if not paths:
        raise ValueError(f"{source}: no image to embed")
    return paths


def read_face(path: str) -> np.ndarray:
    """uint8 (112, 112, 3) RGB of an aligned face file.

    Raises:
        FileNotFoundError: missing. ValueError: undecodable or not 112x112.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError("image file not found")
    with open(path, "rb") as f:
        image = decode_image(f.read(), where=path)
    if image.shape[:2] != (SIZE, SIZE):
        h, w = image.shape[:2]
        raise ValueError(f"image is {w}x{h}, not an aligned 112x112 face (tools/align_faces.py)")
    return image


def _batches(
    paths: list[str], batch_size: int, skipped: list[tuple[str, str]]
) -> Iterator[tuple[list[str], np.ndarray]]:
    """``(paths, uint8 (B, 112, 112, 3))`` of the readable faces; the others go to ``skipped``."""
    names: list[str] = []
    images: list[np.ndarray] = []
    for path in paths:
        try:
            images.append(read_face(path))
            names.append(path)
        except (OSError, ValueError) as e:
            skipped.append((path, str(e).replace(f"{path}: ", "")))
        if len(images) == batch_size:
            yield names, np.stack(images)
            names, images = [], []
    if images:
        yield names, np.stack(images)


def _normalized(emb: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return np.asarray(emb / np.maximum(norms, 1e-12), dtype=np.float32)


def embed_folder(
    embedder: Embedder,
    paths: list[str],
    out_dir: str,
    flip: bool = True,
    normalize: bool = True,
    progress: bool = True,
) -> tuple[int, list[tuple[str, str]]]:
    """Embed ``paths`` and write ``embeddings.npy``, ``index.tsv``, ``skipped.tsv``.

    Args:
        embedder: a ``evaluation.embedders.Embedder``. paths: image files.
        flip: add the mirrored image's embedding. normalize: L2-normalize the rows.

    Returns:
        (rows written, skipped ``(path, reason)``).

    Raises:
        ValueError: no image could be read (the first reason is named).
    """
    from evaluation.embedders import embed_images

    skipped: list[tuple[str, str]] = []
    rows: list[np.ndarray] = []
    names: list[str] = []
    batch = embedder.batch_size
    with progress_bar(progress) as bar:
        task = bar.add_task("embedding", total=len(paths))
        for chunk_names, images in _batches(paths, batch, skipped):
            rows.append(embed_images(embedder, images, flip=flip))
            names += chunk_names
            bar.update(task, completed=len(names) + len(skipped))
    if not rows:
        raise ValueError(f"no image could be embedded (first: {skipped[0][0]}: {skipped[0][1]})")
    emb = np.concatenate(rows)
    emb = _normalized(emb) if normalize else emb.astype(np.float32)
    os.makedirs(out_dir, exist_ok=True)
    with atomic_path(os.path.join(out_dir, "embeddings.npy")) as tmp:
        np.save(tmp, emb)
    index = "".join(f"{i}\t{p}\n" for i, p in enumerate(names))
    write_text_atomic(os.path.join(out_dir, "index.tsv"), "row\tpath\n" + index)
    report = "".join(f"{p}\t{why}\n" for p, why in skipped)
    write_text_atomic(os.path.join(out_dir, "skipped.tsv"), "path\treason\n" + report)
    return len(names), skipped


def threshold_from_results(path: str, target: str | None) -> tuple[float, str]:
    """Cosine threshold ``1 - best_threshold / 2`` of a verification ``results.json``.

    Returns:
        (cosine threshold, where it came from, for the printout).

    Raises:
        FileNotFoundError: missing file. ValueError: not a results file, an unknown target, or
            several targets and no ``target`` chosen.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: results file not found")
    try:
        with open(path, encoding="utf-8") as f:
            targets = json.loads(f.read(16 << 20))["targets"]  # a results.json is a few KB
        names = sorted(targets)
    except RecursionError:  # json recurses per nesting level
        raise ValueError(f"{path}: not a verification results.json (nested too deeply)") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{path}: not a verification results.json (no 'targets')") from None
    if target is None:
        if len(names) != 1:
            raise ValueError(f"{path}: holds targets {names}: choose one with --target")
        target = names[0]
    if target not in targets:
        raise ValueError(f"{path}: no target {target!r} (holds {names})")
    try:
        squared = float(targets[target]["best_threshold"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: target {target!r} has no numeric best_threshold") from None
    where = f"{path} {target} best_threshold {squared:.4g} (squared distance)"
    return 1.0 - squared / 2.0, where


def compare(embedder: Embedder, a: str, b: str, flip: bool = True) -> float:
    """Cosine similarity of the (flip-summed) embeddings of two aligned face files.

    Raises:
        FileNotFoundError / ValueError: a file missing, undecodable or not 112x112 (named).
    """
    from evaluation.embedders import embed_images

    faces = []
    for path in (a, b):
        try:
            faces.append(read_face(path))
        except (OSError, ValueError) as e:
            raise type(e)(f"{path}: {str(e).replace(f'{path}: ', '')}") from None
    emb = _normalized(embed_images(embedder, np.stack(faces), flip=flip))
    return float(emb[0] @ emb[1])


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="run dir, step dir, backbone.pt, backbone.pth or .onnx")
    p.add_argument("images", nargs="?", help="folder of aligned faces, or a list file (--list)")
    p.add_argument("--out", help="output folder (embeddings.npy, index.tsv, skipped.tsv)")
    p.add_argument("--list", action="store_true", help="IMAGES is a text file of paths")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two faces to compare")
    p.add_argument("--results", help="verification results.json giving the threshold")
    p.add_argument("--target", help="the results.json target (when it holds several)")
    p.add_argument("--threshold", type=float, help="cosine threshold for --compare")
    p.add_argument("--no-flip", action="store_true", help="no flip-sum (the image only)")
    p.add_argument("--raw", action="store_true", help="do not L2-normalize the embeddings")
    p.add_argument("--network", help="backbone name for an arcface_torch backbone.pth")
    p.add_argument("--embedding-size", type=int, help="D for a backbone.pth (default 512)")
    p.add_argument("--batch-size", type=int, default=64, help="images per model call")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.compare is None and (args.images is None or args.out is None):
        parser.error("give IMAGES and --out, or --compare A B")
    if args.compare is not None and args.images is not None:
        parser.error("--compare takes no IMAGES")
    if args.results is not None and args.threshold is not None:
        parser.error("give --results or --threshold, not both")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 bad input, 2 usage or a model whose
    metadata contradicts --network/--embedding-size)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_usage(parser, args)
    from evaluation.embedders import MetadataMismatch, check_input_size, load_embedder

    t0 = time.perf_counter()
    flip = not args.no_flip
    try:
        threshold, source = args.threshold, "--threshold"
        if args.results is not None:
            threshold, source = threshold_from_results(args.results, args.target)
        paths = list_images(args.images, args.list) if args.compare is None else []
        embedder = load_embedder(
            args.model,
            args.network,
            batch_size=args.batch_size,
            embedding_size=args.embedding_size,
        )
        check_input_size(embedder, SIZE, SIZE, "aligned faces")  # a fixed-size ONNX input
        if args.compare is not None:
            cosine = compare(embedder, *args.compare, flip=flip)
        else:
            count, skipped = embed_folder(
                embedder, paths, args.out, flip, not args.raw, not args.no_progress
            )
    except (OSError, ValueError) as e:  # models.UnknownModelError is a ValueError
        print(f"embed: error: {e}", file=sys.stderr)
        # a model whose metadata contradicts the options is a usage error, as in the other tools
        return 2 if isinstance(e, MetadataMismatch) else 1
    if args.compare is not None:
        out = io.StringIO()
        out.write(f"cosine similarity {cosine:.4f}")
        if threshold is None:
            out.write(" (no threshold: pass --results results.json or --threshold)")
        else:
            verdict = "same" if cosine > threshold else "different"
            out.write(f" -> {verdict} person (threshold {threshold:.4f} from {source})")
        print(out.getvalue())
        return 0
    print(
        f"embedded {count} faces from {args.images} with {embedder.description} "
        f"({'flip-sum' if flip else 'no flip'}, {'raw' if args.raw else 'L2-normalized'}) "
        f"into {args.out}/embeddings.npy in {time.perf_counter() - t0:.1f} s; "
        f"skipped {len(skipped)} (listed in {args.out}/skipped.tsv)"
    )
    for path, why in skipped[:20]:
        print(f"  {path}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

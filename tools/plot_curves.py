"""Plot the TensorBoard scalars of a run as one grid PNG.

    python tools/plot_curves.py work_dirs/my_run --out curves.png
    python tools/plot_curves.py work_dirs/my_run/tensorboard --tags train/loss,val/lfw/accuracy

Reads every event file under the folder (one run may hold several, e.g. after a resume) with
``evaluation.runs.read_scalars``: points of one tag from several files are merged by step, a
later file winning on a repeated step (the resumed run).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from evaluation.runs import read_scalars

# Shown first, in this order, when present; any other scalar tags follow alphabetically.
PREFERRED = ("train/loss", "train/lr", "train/samples_per_sec")


def choose_tags(available: list[str], wanted: list[str] | None) -> list[str]:
    """Tags to plot: ``wanted`` in order (all must exist), else preferred ones then the rest.

    Raises:
        KeyError: a wanted tag is not in the event files (the message lists what is).
    """
    if wanted:
        missing = [t for t in wanted if t not in available]
        if missing:
            raise KeyError(
                f"plot_curves --tags: {missing} not found; available: {sorted(available)}"
            )
        return list(wanted)
    first = [t for t in PREFERRED if t in available]
    return first + sorted(t for t in available if t not in first)


def plot_curves(
    root: str, out_png: str, tags: list[str] | None = None, ncols: int = 3
) -> list[str]:
    """Draw one subplot per scalar tag of the run under ``root`` and save ``out_png``.

    Returns:
        The tags plotted, in grid order.
    Raises:
        FileNotFoundError: no event files; ValueError: no scalar in them; KeyError: unknown tag.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_scalars(root)
    if not series:
        raise ValueError(f"plot_curves: the event files under {root} hold no scalars")
    tags = choose_tags(list(series), tags)
    ncols = min(ncols, len(tags))
    nrows = math.ceil(len(tags) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.2 * nrows), squeeze=False)
    try:
        for ax, tag in zip(axes.flat, tags):
            steps, values = series[tag]
            ax.plot(steps, values, marker="." if len(steps) < 30 else None)
            ax.set_title(tag, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
            if tag.endswith("/lr") and min(values) > 0:
                ax.set_yscale("log")
        for ax in axes.flat[len(tags) :]:
            ax.axis("off")
        fig.suptitle(os.path.basename(os.path.abspath(root)))
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
        fig.savefig(out_png, dpi=100)
    finally:
        plt.close(fig)
    return tags


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description="Plot TensorBoard scalars of a run as a grid PNG.")
    p.add_argument("run_dir", help="run folder or TensorBoard event folder")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png)")
    p.add_argument("--tags", default=None, help="comma-separated scalar tags (default: all)")
    args = p.parse_args(argv)
    out = args.out or os.path.join(args.run_dir, "curves.png")
    tags = [t.strip() for t in args.tags.split(",") if t.strip()] if args.tags else None
    plotted = plot_curves(args.run_dir, out, tags)
    print(f"wrote {out} ({len(plotted)} plots: {', '.join(plotted)})")
    return plotted


def cli() -> int:
    """Console entry (`arcscale-plot-curves`): 0 when a plot was written, else 1."""
    return 0 if main() else 1


if __name__ == "__main__":
    sys.exit(cli())

"""Table of final verification accuracy per arm over seeds, from the runs' TensorBoard events.

    python tools/compare_runs.py work_dirs/ab/*_[0-9] --baseline default
    python tools/compare_runs.py work_dirs/losses/* --target lfw_heldout --metric tar_at_far

A run folder named ``<arm>_<seed>`` (e.g. ``decay_2``) belongs to arm ``decay``; every arm gets
one row: the final value of ``val/<target>/<metric>`` of each seed, then mean +- sample standard
deviation over its seeds (ddof 1, ``-`` for one seed) and, with ``--baseline``, the
difference of means to that arm. Values are printed in percent. The output is a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys

from evaluation.runs import read_scalars

_RUN_NAME = re.compile(r"^(?P<arm>.+)_(?P<seed>\d+)$")


def final_value(run_dir: str, tag: str) -> float:
    """Last logged value of scalar ``tag`` in the run's TensorBoard events.

    Raises:
        FileNotFoundError: no event file under ``run_dir``.
        KeyError: the run never logged ``tag`` (e.g. it stopped before its final evaluation).
    """
    scalars = read_scalars(run_dir)
    if tag not in scalars:
        raise KeyError(f"compare_runs: {run_dir} has no scalar {tag!r} (has: {sorted(scalars)})")
    return scalars[tag][1][-1]


def group_runs(run_dirs: list[str]) -> dict[str, dict[int, str]]:
    """``{arm: {seed: run_dir}}`` from folder names ``<arm>_<seed>``, arms in first-seen order.

    Raises:
        ValueError: a folder name does not end in ``_<seed>``, or two folders give one arm and seed.
    """
    arms: dict[str, dict[int, str]] = {}
    for d in run_dirs:
        m = _RUN_NAME.match(os.path.basename(os.path.normpath(d)))
        if m is None:
            raise ValueError(f"compare_runs: run folder {d} is not named <arm>_<seed>")
        seeds = arms.setdefault(m["arm"], {})
        seed = int(m["seed"])
        if seed in seeds:
            raise ValueError(
                f"compare_runs: {d} and {seeds[seed]} are both arm {m['arm']} seed {seed}"
            )
        seeds[seed] = d
    return arms


def table(values: dict[str, dict[int, float]], baseline: str | None = None) -> list[str]:
    """Markdown rows: arm, value per seed, mean +- std, and the difference to ``baseline``.

    Args:
        values: ``{arm: {seed: value}}``, values as fractions (0.8259 prints as 82.59).

    Raises:
        KeyError: ``baseline`` is not one of the arms.
    """
    if baseline is not None and baseline not in values:
        raise KeyError(f"compare_runs: no arm {baseline!r} (arms: {sorted(values)})")
    seeds = sorted({s for v in values.values() for s in v})
    head = ["arm", *(f"seed {s}" for s in seeds), "mean +- std"]
    if baseline is not None:
        head.append(f"vs {baseline}".replace("|", "\\|"))
    rows = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    means = {a: statistics.fmean(v.values()) for a, v in values.items()}
    for arm, v in values.items():
        std = f"{100 * statistics.stdev(v.values()):.2f}" if len(v) > 1 else "-"
        name = arm.replace("|", "\\|")  # a `|` in a folder name would split the Markdown cell
        cells = [name, *(f"{100 * v[s]:.2f}" if s in v else "-" for s in seeds)]
        cells.append(f"{100 * means[arm]:.2f} +- {std} (n={len(v)})")
        if baseline is not None:
            cells.append(f"{100 * (means[arm] - means[baseline]):+.2f}")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders named <arm>_<seed>")
    p.add_argument("--target", default="lfw_heldout", help="verification set name (val_targets)")
    p.add_argument("--metric", default="accuracy", choices=["accuracy", "tar_at_far"])
    p.add_argument("--baseline", help="arm the other arms' means are compared with")
    args = p.parse_args(argv)
    tag = f"val/{args.target}/{args.metric}"
    try:
        arms = group_runs(args.runs)
        values = {
            a: {s: final_value(d, tag) for s, d in seeds.items()} for a, seeds in arms.items()
        }
        print("\n".join(table(values, args.baseline)))
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(e.args[0] if e.args else e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

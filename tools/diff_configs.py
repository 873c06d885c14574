"""What two runs' resolved configurations differ in (config, engine, DeepSpeed JSON, batch, steps,
LR schedule), one line per field.

    python tools/diff_configs.py configs/ms1mv3_r50.yaml configs/ms1mv3_r100.yaml
    python tools/diff_configs.py work_dirs/run_a work_dirs/run_b          # finished run folders
    python tools/diff_configs.py configs/x.yaml work_dirs/x --a optim.lr=0.05 --world-size 8

A config file is resolved as `python -m trainer.train FILE --print-config` would (presets,
aliases, "auto" filled; `--a`/`--b` add overrides to each side); a run folder contributes the
`config.yaml` and `ds_config.json` it wrote. Exit 0 when they agree, 1 when they differ, 2 on a
config error.
"""

from __future__ import annotations

import argparse
import os
import sys

from trainer.config import ConfigError
from trainer.inspect_config import diff_resolved, resolved_of

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Command line (see module docstring); prints the differing fields."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("a", help="config file or run folder")
    p.add_argument("b", help="config file or run folder")
    p.add_argument("--a", dest="a_over", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--b", dest="b_over", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--world-size", type=int, default=None, help="ranks (default: WORLD_SIZE or 1)")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():  # as trainer.train: DeepSpeed's accelerator follows torch
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        lines = diff_resolved(
            resolved_of(args.a, args.a_over, args.world_size),
            resolved_of(args.b, args.b_over, args.world_size),
        )
    except ConfigError as e:
        print(f"arcscale: config error: {e}", file=sys.stderr)
        return 2
    print(f"# {args.a} -> {args.b}: {len(lines)} differences")
    for line in lines:
        print(line)
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())

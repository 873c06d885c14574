"""Launched entry of tests/integration/test_margins_e2e.py: the trainer's own `train()` once per
per-loss config, in one process group, so ten losses cost one `accelerate launch`::

    accelerate launch ... -m tests.helpers.loss_configs OUT CONFIG... -- OVERRIDE...

Rank 0 prints `MARK<name> <loss> <sub-centers>` before each config's run.
"""

from __future__ import annotations

import os
import sys

MARK = "=== loss config "


def loss_name(path: str) -> str:
    """`configs/lfw_demo_<name>.yaml` -> `<name>`."""
    return os.path.basename(path)[len("lfw_demo_") : -len(".yaml")]


def run_all(out_root: str, configs: list[str], overrides: list[str]) -> None:
    """`train()` for each config in turn, in this one process group, output in out_root/<name>."""
    import time

    from accelerate.state import AcceleratorState

    from trainer.config import load_config
    from trainer.engine import build_ds_config, resolve_engine_settings
    from trainer.train import train

    for path in configs:
        t0 = time.time()
        name = loss_name(path)
        cfg = load_config(path, [*overrides, f"output={out_root}/{name}"])
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{MARK}{name} {cfg.head.loss} {cfg.head.num_subcenters}", flush=True)
        settings = resolve_engine_settings(cfg)
        train(cfg, settings, build_ds_config(cfg, settings))
        AcceleratorState._reset_state()  # the next run builds its own Accelerator and plugin
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"=== {name} took {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    split = sys.argv.index("--")
    run_all(sys.argv[1], sys.argv[2:split], sys.argv[split + 1 :])

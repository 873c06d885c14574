"""SLURM's task variables -> the launcher variables torch.distributed reads, for ranks started
by `srun` directly (one task per GPU, no torchrun/accelerate between; docs/clusters.md).

`srun` gives every task `SLURM_PROCID` (global rank), `SLURM_LOCALID` (rank on its node),
`SLURM_NODEID`, `SLURM_STEP_NUM_TASKS`, `SLURM_STEP_TASKS_PER_NODE` (e.g. `4(x2),2`) and the
step's node list. The batch script itself also carries `SLURM_PROCID=0` and `SLURM_NTASKS`, but
no `SLURM_STEP_ID`: a trainer started there without `srun` is one process, not rank 0 of N.
Variables a launcher already set (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`) always win, so `srun`
running `accelerate launch` / `torchrun` per node is left to that launcher.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import MutableMapping

_LAUNCHER = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def tasks_per_node(spec: str, node_id: int) -> int:
    """Tasks on node `node_id` from SLURM's compressed list: `tasks_per_node("4(x2),2", 2) == 2`.

    Raises:
        ValueError: a malformed list, or `node_id` past its end.
    """
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise ValueError(f"SLURM tasks-per-node list {spec!r} is malformed")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise ValueError(f"node {node_id} is not in the tasks-per-node list {spec!r}")
    return counts[node_id]


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list (`gpu[07-09,12]` -> `gpu07`), through
    `scontrol show hostnames` where it exists, else parsed for the common forms."""
    try:
        done = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
        )
        if done.returncode == 0 and done.stdout.split():
            return done.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"SLURM node list {nodelist!r} is malformed")
    prefix, ranges = head.group(1), head.group(2)
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def slurm_env(env: MutableMapping[str, str]) -> bool:
    """Under `srun` without a launcher, sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
    and MASTER_ADDR (the step's first host) / MASTER_PORT (derived from the job id, the same on
    every task) unless already set. Returns whether it did.

    Raises:
        ValueError: a malformed SLURM variable.
    """
    if any(k in env for k in _LAUNCHER) or "SLURM_STEP_ID" not in env:
        return False
    if "SLURM_PROCID" not in env:
        return False
    world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or world
    node = int(env.get("SLURM_NODEID", "0"))
    env.update(
        RANK=env["SLURM_PROCID"],
        WORLD_SIZE=world,
        LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
        LOCAL_WORLD_SIZE=str(tasks_per_node(per_node, node)),
        NODE_RANK=str(node),
    )
    if "MASTER_ADDR" not in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        env["MASTER_ADDR"] = first_host(nodes)
    if "MASTER_PORT" not in env:  # every task computes the same port without talking
        env["MASTER_PORT"] = str(15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return True

"""Read back what experiment trackers wrote offline: a W&B offline run's `.wandb` transaction log
and an MLflow `file:` store's metric files. For tests of the trainer's tracker path."""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Any


def _read(path: str, mode: str = "r") -> Any:
    with open(path, mode) as f:
        return f.read()


_BLOCK = 32768  # the `.wandb` file is a LevelDB-style log: 32 KiB blocks of framed records
_HEADER = 7  # b":W&B", a 2-byte magic and a version byte, then 7-byte record headers


def wandb_records(path: str) -> list[Any]:
    """Every `wandb_internal_pb2.Record` of a `.wandb` file, in order (fragments joined)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = _read(path, "rb")
    assert data[:4] == b":W&B", path
    pos, pending, out = _HEADER, b"", []
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # the tail of a block too short for a header
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0:  # zero padding
            break
        pending += data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def wandb_offline_run(wandb_dir: str) -> dict[str, Any]:
    """The one offline run under `wandb_dir`: project, name, tags, config and history rows."""
    (path,) = glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*", "run-*.wandb"))
    run: dict[str, Any] = {"history": [], "config": {}}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(project=record.run.project, name=record.run.display_name)
            run["tags"] = list(record.run.tags)
        elif kind == "config":
            for item in record.config.update:
                run["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            run["history"].append(
                {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
            )
    return run


def mlflow_file_run(root: str) -> dict[str, Any]:
    """The one run of a `file:` store at `root`: experiment and run name, tags, params, and
    metrics as {key: [(step, value), ...]} read from the store's files."""
    (meta,) = [p for p in glob.glob(os.path.join(root, "*", "*", "meta.yaml"))]
    run_dir = os.path.dirname(meta)
    exp_meta = _read(os.path.join(os.path.dirname(run_dir), "meta.yaml"))
    out: dict[str, Any] = {"experiment": exp_meta.split("name: ", 1)[1].split("\n", 1)[0]}
    for part in ("tags", "params"):
        out[part] = {
            os.path.relpath(p, os.path.join(run_dir, part)): _read(p)
            for p in glob.glob(os.path.join(run_dir, part, "**"), recursive=True)
            if os.path.isfile(p)
        }
    out["metrics"] = {}
    for p in glob.glob(os.path.join(run_dir, "metrics", "**"), recursive=True):
        if os.path.isfile(p):
            rows = [line.split() for line in _read(p).splitlines()]
            key = os.path.relpath(p, os.path.join(run_dir, "metrics"))
            out["metrics"][key] = [(int(step), float(value)) for _, value, step in rows]
    return out

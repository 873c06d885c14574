"""Hostile weight files given to `models.weights` (what embed, eval_*, convert_to_onnx and
`model.pretrained` read through), issue 32 items 5, 9, 14, 15: a refused or unreadable file is
one line saying why (never torch's advice to load with weights_only=False), a link loop is not
"does not exist", a file that expands past what the network can need is refused before it is
decompressed, and meta.json's sizes are checked before the network is allocated.
docs/reliability.md maps each case to its test.
"""

import json
import os
import zipfile

import pytest
import torch

from models.weights import load_backbone, read_state_dict, resolve_checkpoint
from tests.helpers.hostile import Payload


def test_hostile_legacy_and_empty_files_are_one_line_saying_why(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save({"w": torch.zeros(2), "x": Payload(marker)}, tmp_path / "hostile.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "legacy.pth")  # a whole pickled module
    (tmp_path / "empty.pt").write_bytes(b"")
    expect = {
        "hostile.pt": "refused to load: it holds a pickled posix.mkdir",
        "legacy.pth": "refused to load: it holds a pickled torch.nn.modules.linear.Linear",
        "empty.pt": "empty.pt: the file is empty (0 bytes)",
    }
    for name, needle in expect.items():
        with pytest.raises(ValueError) as err:
            read_state_dict(tmp_path / name)
        text = str(err.value)
        assert needle in text and "\n" not in text, text
        assert "weights_only" not in text and "add_safe_globals" not in text, text
    assert not marker.exists()


def test_a_symlink_loop_is_not_reported_as_missing(tmp_path):
    loop = tmp_path / "loop.pt"
    os.symlink(loop, loop)
    with pytest.raises(FileNotFoundError, match="cannot be opened: Too many levels of symbolic"):
        resolve_checkpoint(loop)


def _deflated(path, state):
    """`torch.save(state)` re-zipped with its members deflated: a few KB that expand to MBs."""
    torch.save(state, path)
    with zipfile.ZipFile(path) as src:
        members = [(info, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info, data in members:
            dst.writestr(info.filename, data)


def test_a_file_that_expands_past_the_networks_size_is_refused_before_decompressing(tmp_path):
    """Issue 32 item 9: a 0.5 MB .pt given as model.pretrained added 516 MB of RSS."""
    from models.weights import state_bytes
    from tests.helpers.tiny_eval import TINY_IRESNET, tiny_iresnet

    step = tmp_path / "step_1"
    step.mkdir()
    state = tiny_iresnet().state_dict()
    limit = state_bytes(tiny_iresnet())
    state["extra"] = torch.zeros(limit // 4 + 1)  # zeros: deflate to ~1/1000
    _deflated(step / "backbone.pt", state)
    assert os.path.getsize(step / "backbone.pt") < limit // 10
    (step / "meta.json").write_text(json.dumps(TINY_IRESNET))
    with pytest.raises(ValueError, match=r"backbone\.pt: refused: its members expand to \d+ bytes"):
        read_state_dict(step / "backbone.pt", max_bytes=limit)
    with pytest.raises(ValueError, match="refused: its members expand to"):
        load_backbone(step)  # embed / eval tools: bounded by the network read from meta.json


@pytest.mark.parametrize(
    "field, needle",
    [
        ({"embedding_size": 262144}, "'embedding_size' must be an integer in [1, 65536]"),
        ({"embedding_size": 2**40}, "'embedding_size' must be an integer in [1, 65536]"),
        ({"model_kwargs": "base_width=8"}, "'model_kwargs' must be an object"),
        ({"model_kwargs": {"widthh": 8}}, "does not accept ['widthh']"),
    ],
)
def test_meta_json_sizes_are_checked_before_the_network_is_built(tmp_path, field, needle):
    """Issue 32 item 5: embedding_size 262144 made embed.py allocate 4.2 GB before it checked a
    weight (2^40: a traceback); model_kwargs as a string or with an unknown key: tracebacks."""
    from models import registry
    from tests.helpers.tiny_eval import TINY_IRESNET, tiny_iresnet

    step = tmp_path / "step_1"
    step.mkdir()
    torch.save(tiny_iresnet().state_dict(), step / "backbone.pt")
    (step / "meta.json").write_text(json.dumps({**TINY_IRESNET, **field}))
    built = []
    real = registry.create

    def counting(*a, **k):
        built.append(torch.get_default_device())
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("models.weights.create", counting)
        with pytest.raises(ValueError) as err:
            load_backbone(step)
    assert needle in str(err.value) and "meta.json" in str(err.value), str(err.value)
    assert all(device.type == "meta" for device in built), built  # nothing real was allocated

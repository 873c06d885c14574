"""The output folder must be one that every rank sees (#28 item 2): two gloo ranks whose `output`
is the same folder pass; a rank whose `output` is a disk of its own (simulated by giving rank 1
another folder, as a node-local disk at the same path would be) makes every rank raise."""

import os

import pytest

from tests.helpers.distributed import run_distributed
from trainer.checkpoint.manager import check_output_shared


def _check(rank, world, folders):
    from trainer.config import ConfigError

    try:
        check_output_shared(folders[rank], rank, world)
    except ConfigError as e:
        return str(e)
    return None


@pytest.mark.parametrize("shared", [True, False])
def test_every_rank_sees_rank0s_token_or_all_refuse(tmp_path, shared):
    folders = [str(tmp_path / "a"), str(tmp_path / ("a" if shared else "b"))]
    for f in folders:
        os.makedirs(f, exist_ok=True)
    errors = run_distributed(_check, world_size=2, args=(folders,))
    if shared:
        assert errors == [None, None]
    else:
        for folder, error in zip(folders, errors):  # each rank names its view of `output`
            assert error.startswith(f"output: {folder} is not shared"), errors
            assert "rank(s) 1 do not see the file rank 0 wrote" in error
    assert os.listdir(folders[0]) == [] and os.listdir(folders[1]) == []  # token removed

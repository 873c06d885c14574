"""trainer/data_setup.py: `data.num_workers: auto` gives each rank its share of the host's CPUs."""

from __future__ import annotations

import pytest

from trainer.config import ConfigError, load_config
from trainer.data_setup import AUTO_WORKERS_MAX, resolve_num_workers

SYNTH = ["data.kind=synthetic", "data.num_image=64", "data.num_classes=8"]


@pytest.mark.parametrize(
    "env,cpus,want",
    [
        ({"LOCAL_WORLD_SIZE": "8"}, 224, AUTO_WORKERS_MAX),  # DGX H100: 27 would be available
        ({"LOCAL_WORLD_SIZE": "8"}, 64, 7),  # torchrun / accelerate
        ({"LOCAL_SIZE": "4"}, 16, 3),  # the DeepSpeed launcher's name
        ({}, 2, 1),  # one rank on this 2-core machine
        ({"LOCAL_WORLD_SIZE": "2"}, 2, 0),  # fewer cores than ranks: load in the main process
    ],
)
def test_auto_workers_share_the_host_per_local_rank(env, cpus, want):
    assert resolve_num_workers("auto", env, cpus) == want
    assert resolve_num_workers(3, env, cpus) == 3  # an explicit count is used as given


def test_num_workers_defaults_to_auto_and_is_validated():
    assert load_config(None, SYNTH).data.num_workers == "auto"
    assert load_config(None, [*SYNTH, "data.num_workers=0"]).data.num_workers == 0
    for bad in ("-1", "many", "true", "1.5"):
        with pytest.raises(ConfigError, match="data.num_workers: must be an integer >= 0 or auto"):
            load_config(None, [*SYNTH, f"data.num_workers={bad}"])

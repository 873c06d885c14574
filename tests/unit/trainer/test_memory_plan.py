"""The memory planner (trainer/memory_plan.py): its scaling laws on a fixed activation profile,
and the measured activation profile of a tiny network. The command line:
tests/unit/tools/test_plan_memory.py; the training benchmark: tests/unit/perf/."""

import pytest

from trainer import memory_plan

TINY = dict(network="r18", model_kwargs={"base_width": 8}, embedding_size=64)
# A fixed activation profile keeps the scaling tests free of model runs.
PROFILE = {"params": 10_000_000, "float_bytes": 4e6, "other_bytes": 1e5, "largest_float_bytes": 5e5}


def _plan(**kw):
    args = dict(
        network="r100",
        embedding_size=512,
        num_classes=1_000_000,
        sample_rate=0.3,
        batch_size=64,
        world_size=8,
        zero_stage=2,
        precision="bf16",
        profile=PROFILE,
    )
    args.update(kw)
    return memory_plan.plan(**args)


def _head_bytes(result):
    return sum(b for name, b in result["device"].items() if name.startswith("head"))


# -- scaling laws ----------------------------------------------------------------------------------
def test_zero2_optimizer_state_halves_when_world_doubles():
    name = "optimizer state (sgd)"
    a, b = _plan(world_size=4)["device"][name], _plan(world_size=8)["device"][name]
    assert a == pytest.approx(2 * b, rel=1e-6)
    # ZeRO-2 also partitions gradients, ZeRO-1 does not
    g = "backbone gradients (bf16)"
    assert _plan(world_size=4)["device"][g] == pytest.approx(2 * _plan(world_size=8)["device"][g])
    z1 = _plan(world_size=4, zero_stage=1)["device"][g]
    assert z1 == _plan(world_size=8, zero_stage=1)["device"][g]


def test_zero3_partitions_weights_and_offload_moves_state_to_host():
    w = "backbone weights (bf16)"
    assert _plan(zero_stage=3)["device"][w] * 8 == pytest.approx(_plan()["device"][w], rel=1e-6)
    off = _plan(offload=True)
    assert "optimizer state (sgd)" in off["host"] and "optimizer state (sgd)" not in off["device"]
    assert off["device_total"] < _plan()["device_total"]
    adamw = _plan(optimizer="adamw")["device"]["optimizer state (adamw)"]
    assert adamw == pytest.approx(2 * _plan()["device"]["optimizer state (sgd)"], rel=1e-6)


def test_head_memory_linear_in_classes():
    heads = [_head_bytes(_plan(num_classes=c)) for c in (8_000_000, 16_000_000, 24_000_000)]
    assert heads[1] - heads[0] == pytest.approx(heads[2] - heads[1], rel=1e-4)
    assert heads[1] - heads[0] > 0


def test_logits_linear_in_sample_rate():
    name = "logits + softmax buffer (fp32)"
    emb = 2 * 4 * 64 * 8 * 512  # gathered embeddings, independent of the sample rate
    a, b = (_plan(sample_rate=r)["device"][name] - emb for r in (0.2, 0.4))
    assert b == pytest.approx(2 * a, rel=1e-4)


def test_max_classes_grows_with_memory_and_is_tight():
    small = _plan(device_memory_gb=16)["max_num_classes"]
    large = _plan(device_memory_gb=32)["max_num_classes"]
    assert 0 < small < large
    fits = _plan(num_classes=large, device_memory_gb=32)
    assert fits["device_total"] <= 32 * 2**30
    assert _plan(num_classes=large + 8 * 1000)["device_total"] > 32 * 2**30
    assert _plan(device_memory_gb=1e-3)["max_num_classes"] == 0


def test_subcenters_count_rows_per_class():
    plain, sub = _plan(num_classes=3_000_000), _plan(num_classes=1_000_000, num_subcenters=3)
    assert sub["sampled_per_rank"] * 3 == plain["sampled_per_rank"]  # K counts classes
    for name in ("head centers (fp32)", "head optimizer state (sgd)",
                 "head sampled rows + gradient", "head step (gathered rows)"):  # fmt: skip
        assert sub["device"][name] == plain["device"][name], name  # same rows
    logits = "logits + softmax buffer (fp32)"
    one = _plan(num_classes=1_000_000)
    n, k = 64 * 8, one["sampled_per_rank"]
    assert sub["device"][logits] - one["device"][logits] == 4 * n * k * 3 + n * k
    per_class = [_plan(device_memory_gb=32, num_subcenters=s)["max_num_classes"] for s in (1, 3)]
    # a sub-center class costs 3 rows but its softmax buffers are one column: under 3 classes
    assert 1 / 3 < per_class[1] / per_class[0] < 0.36


@pytest.mark.parametrize(
    "bad",
    [dict(zero_stage=4), dict(precision="fp8"), dict(sample_rate=0.0), dict(world_size=0),
     dict(num_subcenters=0)],
)  # fmt: skip
def test_plan_rejects_bad_arguments(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        _plan(**bad)


# -- measurement -----------------------------------------------------------------------------------
def test_activation_profile_linear_in_batch_and_reduced_by_checkpointing():
    two = memory_plan.measure_activations(**TINY, batch=2)
    four = memory_plan.measure_activations(**TINY, batch=4)
    ckpt = memory_plan.measure_activations(**TINY, grad_checkpointing=True, batch=2)
    assert two["float_bytes"] > 0
    assert four["float_bytes"] == pytest.approx(two["float_bytes"], rel=0.05)
    assert ckpt["float_bytes"] < 0.7 * two["float_bytes"]
    assert ckpt["params"] == two["params"] > 0

"""`engine.compile` (issue 28 item 11): opt-in torch.compile of the backbone, ZeRO-1/2 only.
The compiled backbone (with activation checkpointing, whose recompute runs inside the compiled
backward) matches eager in loss, gradients and BatchNorm statistics; ZeRO-3 is refused with a
config error at load and once the stage is resolved; the engine compiles in place (same keys).
Speed: benchmarks/bench_compile.py (docs/benchmarks.md)."""

import copy

import pytest
import torch

from trainer.config import ConfigError, load_config
from trainer.engine import prepare_backbone

SYNTH = ["data.kind=synthetic", "data.num_classes=10", "data.num_image=64"]


def test_compile_is_opt_in_and_refuses_zero3():
    assert load_config(None, SYNTH).engine.compile is False
    assert load_config(None, [*SYNTH, "engine.compile=true", "engine.zero_stage=2"]).engine.compile
    with pytest.raises(ConfigError, match=r"engine\.compile: is ZeRO-1/2 only"):
        load_config(None, [*SYNTH, "engine.compile=true", "engine.zero_stage=3"])
    # stage 3 from the launch config or the JSON: refused before anything is built
    cfg = load_config(None, [*SYNTH, "engine.compile=true"])
    ds = {"zero_optimization": {"stage": 3}}
    with pytest.raises(ConfigError, match=r"engine\.compile .*resolved to 3"):
        prepare_backbone(cfg, None, torch.nn.Linear(2, 2), ds)


def test_compiled_backbone_matches_eager(one_thread):
    """Compiled as DeepSpeed's `engine.compile()` does (`module.compile(backend=...)`), two
    training-mode steps on one batch: embeddings, gradients and BatchNorm buffers equal eager
    within float tolerance. Backend `aot_eager`: dynamo's graph capture and AOTAutograd's
    forward/backward split (where the checkpointed recompute and BatchNorm's buffer updates are
    decided) exactly as inductor gets them, without inductor's C++ code generation, which costs
    minutes on 2 cores (inductor's numbers: benchmarks/bench_compile.py's diff columns)."""
    from models.iresnet import IResNet
    from trainer.engine import keep_batchnorm_stats_fp32

    torch.manual_seed(0)
    eager = IResNet([1, 1, 1, 1], embedding_size=8, base_width=8)
    eager.set_grad_checkpointing(True)
    keep_batchnorm_stats_fp32(eager, torch.device("cpu"))
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="aot_eager")
    x = torch.randn(4, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    outs: dict[str, list] = {"eager": [], "compiled": []}
    for name, net in (("eager", eager), ("compiled", compiled)):
        for _ in range(2):  # forward, backward per micro-batch, as trainer/step.py
            outs[name].append(net(x))
            outs[name][-1].pow(2).mean().backward()
    for a, b in zip(outs["eager"], outs["compiled"]):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-3, msg=name)
    for (name, a), b in zip(eager.named_buffers(), compiled.buffers()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)  # counted once per step
    assert int(compiled.bn2.num_batches_tracked) == 2


class _Engine:
    """What `prepare_backbone` uses of a DeepSpeed engine; records `compile()` calls."""

    def __init__(self, module):
        self.module, self.compiled = module, 0

    def train(self):
        return self

    def compile(self):  # DeepSpeed: self.module.compile(backend=accelerator's backend)
        self.compiled += 1


class _Accelerator:
    def prepare(self, model, optimizer):
        return _Engine(model), optimizer


@pytest.mark.parametrize("flag", [False, True])
def test_prepare_backbone_compiles_only_when_asked(flag):
    cfg = load_config(None, [*SYNTH, f"engine.compile={str(flag).lower()}"])
    net = torch.nn.Linear(2, 2)
    engine = prepare_backbone(cfg, _Accelerator(), net, {"zero_optimization": {"stage": 2}})
    assert engine.module is net and engine.compiled == int(flag)

"""Input memory layout (trainer/memory_format.py) in a child process: the layout `auto` picks
trains each narrow test network without crashing (in-process checks:
tests/unit/trainer/test_memory_format.py)."""

import sys
import textwrap

from tests.helpers.launch import REPO, run_cmd


def test_auto_layout_trains_without_crashing():
    """One forward+backward of each narrow test network in the layout `auto` picks, in a child
    process: on an AVX-512 CPU the channels_last weight gradient of r18 width 8's downsample
    corrupts the heap (SIGSEGV), which would kill pytest itself."""
    code = textwrap.dedent(
        """
        import torch, models
        from trainer.memory_format import input_memory_format
        torch.manual_seed(0)
        for name, kw in (("r18", {"base_width": 8}), ("r18", {"base_width": 16}),
                         ("mbf", {"scale": 1})):
            net = models.create(name, embedding_size=64, **kw)
            fmt, _ = input_memory_format(net, torch.device("cpu"))
            x = torch.randn(16, 3, 112, 112).contiguous(memory_format=fmt)
            for _ in range(2):
                net(x).square().sum().backward()
            assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
            print(name, kw, fmt, "ok", flush=True)
        """
    )
    env = {"PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = run_cmd([sys.executable, "-c", code], env=env, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    assert proc.stdout.count(" ok") == 3, proc.stdout

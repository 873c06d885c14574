"""Measurement helpers shared by the benchmark scripts and the GPU check: host memory probes,
one timed training-step case (in this process or a fresh one), loader throughput.

Why a package of its own: ``benchmarks/`` and ``tools/`` hold command-line scripts, which are
leaves (docs/design.md): they import the library, never each other, so code that more than one
script needs cannot live in a script. It is not training code either: ``trainer/`` is what a
run needs, and these helpers only observe it (they build a run through ``trainer.run`` and time
``trainer.step.train_step``), so they sit above ``trainer/`` and ``data/`` and below the scripts.
Nothing in the library imports ``perf``.

Modules: ``memory_probe`` (``VmRSS``/``VmHWM`` of /proc/self, peak reset), ``train_step``
(``Case``, ``run_case``: phases and peak memory of one training step), ``isolated``
(``run_isolated``: a case in a fresh process), ``loader_speed`` (``measure``: images/s of a
loader). Import the module you need; this package imports none of them (``memory_probe`` must
stay free of torch so ``benchmarks/bench_index.py`` measures the index, not its imports).
"""

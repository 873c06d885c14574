"""Host memory of this process from Linux ``/proc/self``: resident set now and at its peak.

``VmHWM`` (peak RSS) can be reset to the current RSS, so a benchmark can measure the peak of one
phase (``ru_maxrss`` cannot be reset and survives exec). Used by ``perf.train_step`` (peak RSS of
a training-step case on CPU) and ``benchmarks/bench_index.py`` (RSS per rank of the shared image
index); it imports nothing, so a probe measures the caller, not its own imports.
"""

from __future__ import annotations


def status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (``VmRSS`` now, ``VmHWM`` peak) in bytes.

    Raises:
        RuntimeError: the field is not there (not Linux, or an unknown field name).
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} field")


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` code 5); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

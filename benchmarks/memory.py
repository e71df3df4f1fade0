"""This process's memory, for the benchmarks: MiniBooth's progress lines and run records, the UNet step's peak-RSS
child processes (Linux /proc; fallbacks elsewhere).

Owns resident-set readings only, and imports no torch (a child process measuring its own peak stays small); what
autograd keeps for backward is :mod:`benchmarks.measure`'s."""

from __future__ import annotations

import resource
from pathlib import Path


def status_kib(field_name: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, IndexError, ValueError):
        pass
    return None


def resident_mib() -> float:
    """Resident memory now (0 where unavailable)."""
    return (status_kib("VmRSS") or 0) / 1024


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux ``VmHWM``, which starts afresh at exec). ``ru_maxrss`` is the
    fallback elsewhere: on Linux it survives exec, so a child started by a 2 GB parent reported 2 GB whatever it
    used (the first full run's seed-0 records)."""
    peak = status_kib("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return peak / 1024


def reset_peak_rss() -> None:
    """Start the peak (``VmHWM``) afresh at the current RSS, so a peak read later is that of what ran since (Linux
    >= 4.0: writing 5 to ``/proc/self/clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")

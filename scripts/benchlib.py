"""Shared timing helpers of the side-by-side benchmarks in ``scripts/`` (imported as ``benchlib``;
``python scripts/bench_*.py`` puts this folder on ``sys.path``).

The machine these run on is shared, so a ratio is only meaningful next to the load it was measured
under: ``interleaved`` runs the contenders round-robin (drifting load touches all alike) and records
``os.getloadavg()`` at every round; ``report`` prints medians, the ratio of each contender to the
baseline and the load range.

Peak memory [our choice]: ``peak_rss_growth`` runs one side in a fresh ``spawn``ed process and reports
its peak resident set size during the measured calls minus the RSS it had after its setup (imports,
model build, inputs, warm-up), the peak being reset after the setup (Linux ``/proc/self/clear_refs``).
Each side is measured alone, with no allocator state left by the other, and JAX's XLA buffers
(invisible to ``tracemalloc``) count exactly like torch's allocations.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from typing import Any


def load() -> str:
    """The 1/5/15-minute load averages and the core count, e.g. ``"load 2.1/1.9/1.5 on 2 cores"``."""
    one, five, fifteen = os.getloadavg()
    return f"load {one:.1f}/{five:.1f}/{fifteen:.1f} on {os.cpu_count()} cores"


def interleaved(contenders: dict[str, Callable[[], Any]], repeats: int,
                sync: Callable[[Any], Any] = lambda out: out) -> tuple[dict[str, list[float]], list[float]]:
    """Seconds of ``repeats`` round-robin calls of each contender, and the 1-minute load per round.

    Each call's result goes through ``sync`` (e.g. ``jax.block_until_ready``) inside the timing.
    The caller warms every contender up (compiles) before.
    """
    times = {name: [] for name in contenders}
    loads = []
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            sync(fn())
            times[name].append(time.perf_counter() - start)
        loads.append(os.getloadavg()[0])
    return times, loads


def report(times: dict[str, list[float]], loads: list[float], baseline: str, *, unit: str = "s",
           work: float | None = None, work_unit: str = "") -> dict[str, float]:
    """Prints a median (min..max) per contender and ``baseline / contender`` ratios (> 1: faster than
    the baseline), with the load range; ``work`` per call adds a throughput column. Returns medians."""
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        rate = f"  {work / medians[name]:10.1f} {work_unit}/s" if work else ""
        ratio = medians[baseline] / medians[name]
        print(f"  {name:28s} median {medians[name]:8.3f} {unit} (min {min(values):.3f}, max {max(values):.3f})"
              f"{rate}  {baseline}/this = {ratio:5.2f}x")
    print(f"  1-min load over the rounds: {min(loads):.1f}..{max(loads):.1f}; now {load()}")
    return medians


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _child(setup: Callable[[], Callable[[], Any]], repeats: int, queue) -> None:
    run = setup()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    start = _status_kib("VmRSS")
    for _ in range(repeats):
        run()
    queue.put(_status_kib("VmHWM") - start)


def peak_rss_growth(setup: Callable[[], Callable[[], Any]], repeats: int = 1) -> float:
    """MiB by which a fresh process's peak RSS grows over ``repeats`` calls of ``setup()``'s function.

    ``setup`` must be picklable (a module-level function or a ``functools.partial`` of one): it runs
    in a ``spawn``ed process, builds everything (model, inputs) and returns the zero-argument call to
    measure, already compiled / warmed up. The peak (``VmHWM``) is reset after the setup, so
    compilation and the inputs themselves are not counted; what remains is what the call allocates
    at its peak (activations, logits, temporaries, outputs).
    """
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(setup, repeats, queue))
    process.start()
    growth = queue.get()
    process.join()
    return growth / 1024

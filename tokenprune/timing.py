"""Timing that survives a shared machine: calls timed in turn, medians, and how busy the machine was.

``interleaved_medians`` times several calls alternately (reversed order on odd repeats), so that drift in
machine load hits all of them alike, and reports the CPU share other processes used meanwhile; ``timed``
uses CUDA events on a GPU, where the host clock would time kernel launches. The benchmarks
(``tokenprune.eval``) and ``tokenprune.check_speed`` share them.
"""
from __future__ import annotations

import os
import statistics
import time

import torch


class ForeignLoad:
    """Fraction of all CPUs that other processes used while the block ran (Linux only), in [0, 1].

    Both clocks it reads (``/proc/stat`` and ``os.times``) count in ticks of 10 ms, so over a block of a few
    tens of milliseconds the difference is a tick or two either way: the raw ratio then reached 1.32 (a 7 ms
    prefill timed thrice, two CPUs). A share of all CPUs is never above 1, nor below 0: it is clamped there."""

    STAT = "/proc/stat"  # where the machine's CPU times are read (Linux)

    def __enter__(self):
        self.value = None
        self._start = self._sample()
        return self

    def __exit__(self, *exc):
        end = self._sample()
        if self._start and end:
            busy = end[0] - self._start[0]
            own = end[1] - self._start[1]
            wall = end[2] - self._start[2]
            self.value = min(1.0, max(0.0, (busy - own) / (wall * os.cpu_count())))

    @classmethod
    def _sample(cls):
        try:
            with open(cls.STAT) as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except OSError:
            return None
        return busy_seconds(fields), sum(os.times()[:2]), time.perf_counter()


def busy_seconds(fields: list[int]) -> float:
    """The CPU time of ``/proc/stat``'s first line (ticks: user nice system idle iowait irq softirq steal guest
    guest_nice, the last ones absent on old kernels) that was spent running, in seconds: all but idle and iowait,
    and without guest and guest_nice, which the kernel already counts inside user and nice (a VM host's guests
    were counted twice)."""
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def timed(call, device: torch.device = torch.device("cpu")):
    """``(call(), seconds it took)``. On CUDA, kernels run asynchronously, so the host clock would time their
    launches: two CUDA events on the device's stream bracket the call and the host waits for the second;
    elsewhere the host's wall clock."""
    if device.type != "cuda":
        start = time.perf_counter()
        result = call()
        return result, time.perf_counter() - start
    stream = torch.cuda.current_stream(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    result = call()
    end.record(stream)
    end.synchronize()
    return result, start.elapsed_time(end) / 1000  # elapsed_time is in milliseconds


def interleaved_medians(calls: dict, repeats: int, warmup: int = 2,
                        device: torch.device = torch.device("cpu")) -> tuple[dict[str, float], float | None]:
    """Median seconds of each zero-argument call, timed in turn (reversed order on odd repeats, so drift
    in machine load hits all alike; ``timed`` on ``device``), and the CPU share other processes used meanwhile."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the warm-up's kernels finish before the first timing
    times = {name: [] for name in calls}
    with ForeignLoad() as load:
        for i in range(repeats):
            order = list(calls.items())
            for name, call in order if i % 2 == 0 else order[::-1]:
                times[name].append(timed(call, device)[1])
    return {name: statistics.median(t) for name, t in times.items()}, load.value

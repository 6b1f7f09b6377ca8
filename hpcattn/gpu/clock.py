"""The step clock of the CUDA backend: kernels run asynchronously, so CUDA events bracket the
compute, and the host waits for them only after the exchange (which keeps the overlap)."""
from __future__ import annotations

import time


class EventClock:
    """``start()``, ``computed()``, ``stop() -> (compute seconds, rest of the step)``."""

    def __init__(self):
        import cupy

        self.cuda = cupy.cuda

    def start(self):
        self.t0 = time.perf_counter()
        self.e0 = self.cuda.Event()
        self.e0.record()

    def computed(self):
        self.e1 = self.cuda.Event()
        self.e1.record()

    def stop(self) -> tuple[float, float]:
        self.e1.synchronize()
        busy = self.cuda.get_elapsed_time(self.e0, self.e1) / 1e3
        return busy, max(0.0, time.perf_counter() - self.t0 - busy)

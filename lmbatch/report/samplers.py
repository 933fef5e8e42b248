"""Figures sampled while something runs: a callback on a period (`Periodic`), and the peak of a figure
(`PeakSampler`: a process tree's memory, Ray's object store).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional


class Periodic:
    """Calls `fn` on a thread every `interval` seconds while in a `with` block. Stops early once
    `fn` raises: what it watches has gone (a process, Ray shutting down)."""

    def __init__(self, fn: Callable[[], Any], interval: float):
        self.fn, self.interval = fn, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _call(self) -> bool:
        try:
            self.fn()
            return True
        except Exception:  # noqa: BLE001 - see the class docstring
            return False

    def _run(self):
        while not self._stop.wait(self.interval) and self._call():
            pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, exc_type, *exc):
        self._stop.set()
        if exc_type is None:
            self._thread.join()


class PeakSampler(Periodic):
    """Calls `measure` every `interval` seconds while in a `with` block, and at its start and end,
    and keeps the peak of what it returns (a number, or a tuple of numbers whose peaks are kept
    one by one).

    Sampling costs CPU that the measured work then lacks, so intervals are seconds, not
    milliseconds. A `measure` of None, or one that raises, leaves `peak` as far as it got.
    """

    def __init__(self, measure: Optional[Callable[[], Any]], interval: float):
        self.measure, self.peak = measure, None
        super().__init__(self._take, interval)

    def _take(self) -> None:
        value = self.measure()
        if self.peak is None:
            self.peak = value
        elif isinstance(value, tuple):
            self.peak = tuple(map(max, self.peak, value))
        else:
            self.peak = max(self.peak, value)

    def __enter__(self):
        if self.measure is not None and self._call():
            super().__enter__()
        return self

    def __exit__(self, exc_type, *exc):
        if self._thread.is_alive():
            super().__exit__(exc_type, *exc)
            if exc_type is None:
                self._call()


def object_store_bytes() -> Optional[Callable[[], int]]:
    """A measure of the bytes in Ray's object store, asked of the raylet through the call behind
    `ray memory`; None where that needs grpcio (installed by `ray[default]`, not by `ray[data]`)."""
    try:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        measure = lambda: get_memory_info_reply(state).store_stats.object_store_bytes_used  # noqa: E731
        measure()
        return measure
    except Exception:  # noqa: BLE001 - no grpcio, or another Ray version: the figure is optional
        return None

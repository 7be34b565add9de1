"""Interval engines: each UNet call runs the engine of its timestep's interval.

Per call, ``k = intervals.index(t)`` (the one timestep -> interval map, the same object
training used) picks the runner serving interval k (per-interval layout) and, for the
single-graph layouts, the selector value fed to the graph (``tuned`` / ``expert``). A batch
whose samples fall in different intervals is split per runner, so any caller is served
correctly; diffusers pipelines send one timestep per call.

Residency: every runner active (default), or ``low_memory``: only the current runner is
active and the one the schedule needs next is activated ahead on a background thread while
the current one computes; the one left behind is freed on that thread too, before the next
load it queues, so no call waits for it and at most two are ever resident. The order comes
from :meth:`IntervalEngines.expect` (the schedule's timesteps) or, by default, from the fact
that sampling visits intervals from K-1 down to 0; it wraps around, so the next image's
first engine loads while the last one finishes.

Every call is recorded (:class:`EngineCall`): timestep, interval, engine, seconds, and the
switch time, the time spent making a different engine ready than the previous call's.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch


@dataclass
class EngineCall:
    """One UNet call: its timestep and interval (lists for a mixed batch), the engine that
    ran, its seconds, and the seconds spent switching to that engine (0 if it did not change)."""

    timestep: float | list
    interval: int | list
    engine: str
    seconds: float
    switch_seconds: float
    switched: bool


class IntervalEngines:
    """Dispatches UNet calls to the runners of their intervals (see module doc).

    Args:
        intervals: the deploy dir's :class:`~qpdeploy.intervals.Intervals`.
        runners: Polygraphy-style runners (not yet active), one per engine.
        runner_of_interval: index into ``runners`` for each interval.
        dispatch: the deploy dir's :class:`~qpdeploy.exporters.manifest.Dispatch` (feeds the
            selector input of a one-graph layout), or None.
        output: name of the noise-prediction output.
        low_memory: keep only the current runner (and the next, being prepared) active.
        constants: feeds that go with every call unsplit (a multi-subject graph's scale
            tables, which have no batch dimension).
    """

    def __init__(self, intervals, runners, runner_of_interval, dispatch=None, output="noise_pred",
                 low_memory: bool = False, constants: dict | None = None):
        self.intervals, self.runners = intervals, list(runners)
        self.runner_of_interval = list(runner_of_interval)
        self.dispatch, self.output, self.low_memory = dispatch, output, low_memory
        self.constants = dict(constants or {})
        self.history: list[EngineCall] = []
        self.load_seconds = 0.0
        self.loads = 0  # runner activations, prefetches included
        self.peak_resident = 0  # most runners active at once (a prefetch in flight counts)
        self.stalls = 0  # calls that had to load their engine on the spot
        self.plan = _dedupe(self.runner_of_interval[k] for k in reversed(range(intervals.k)))
        self._current, self._loaded, self._pending, self._pool = None, set(), None, None
        self._retiring = []  # futures of deactivations queued on the background thread

    # -- residency ---------------------------------------------------------------------

    def open(self) -> "IntervalEngines":
        """Activate every runner, or (low memory) the first planned one and prepare the next."""
        start = time.perf_counter()
        try:
            for unit in ([self.plan[0]] if self.low_memory else range(len(self.runners))):
                self._activate(unit)
            if self.low_memory:
                self._prefetch(self._next_after(self.plan[0]))
        except BaseException:
            self.close()  # free what did load before the failing one
            raise
        self.load_seconds += time.perf_counter() - start
        return self

    def close(self) -> None:
        """Deactivate every active runner (waiting for a load or a release in flight)."""
        try:
            try:
                self._wait_pending()
            finally:
                self._wait_retired()
        finally:
            for unit in sorted(self._loaded):
                self.runners[unit].deactivate()
            self._loaded.clear()
            self._current = None
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()

    @property
    def resident(self) -> list[int]:
        """Indices of the active runners."""
        return sorted(self._loaded)

    def expect(self, timesteps) -> None:
        """Tell the scheduler the coming calls' timesteps, so low-memory mode prepares the
        right engine next (the default order assumes descending timesteps)."""
        plan = _dedupe(self.runner_of_interval[self.intervals.index(float(t))] for t in timesteps)
        self.plan = plan or self.plan

    def _activate(self, unit: int) -> None:
        self._wait_retired()  # a load here, in the caller's thread, starts once the others are freed
        self._count_load()
        self.runners[unit].activate()
        self._loaded.add(unit)

    def _count_load(self) -> None:
        self.loads += 1
        self.peak_resident = max(self.peak_resident, len(self._loaded) + (self._pending is not None) + 1)

    def _next_after(self, unit: int) -> int | None:
        if len(set(self.plan)) < 2:
            return None
        if unit not in self.plan:
            return self.plan[0]
        return self.plan[(self.plan.index(unit) + 1) % len(self.plan)]

    def _background(self) -> ThreadPoolExecutor:
        """The one background thread: its queue runs releases and loads in the order given."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qpdeploy-prefetch")
        return self._pool

    def _prefetch(self, unit: int | None) -> None:
        if unit is None or unit in self._loaded or (self._pending is not None and self._pending[0] == unit):
            return
        self._count_load()
        self._pending = (unit, self._background().submit(self.runners[unit].activate))

    def _retire(self, unit: int) -> None:
        """Free ``unit`` on the background thread, ahead of any load queued after it."""
        self._loaded.discard(unit)
        self._retiring.append(self._background().submit(self.runners[unit].deactivate))

    def _wait_retired(self, only_done: bool = False) -> None:
        """Wait for the queued releases (or collect the finished ones); a release's error
        surfaces here, in the caller's thread."""
        while self._retiring and (not only_done or self._retiring[0].done()):
            self._retiring.pop(0).result()

    def _wait_pending(self) -> None:
        if self._pending is not None:
            unit, future = self._pending
            self._pending = None
            future.result()  # a load error surfaces here, in the caller's thread
            self._loaded.add(unit)

    def _acquire(self, unit: int) -> float | None:
        """Make ``unit`` the current runner; returns the seconds that took (None: no change).

        Low memory: keep ``unit`` and the one planned after it, free the rest (on the
        background thread), load ``unit`` now only if no prefetch foresaw it (a stall), then
        prefetch the next one.
        """
        if unit == self._current:
            return None
        start = time.perf_counter()
        if self.low_memory:
            self._wait_retired(only_done=True)
            keep = {unit, self._next_after(unit)}
            if self._pending is not None and (self._pending[0] == unit or self._pending[0] not in keep):
                self._wait_pending()
            for other in sorted(self._loaded - keep):
                self._retire(other)
        if unit not in self._loaded:
            self.stalls += 1
            self._activate(unit)
        if self.low_memory:
            self._prefetch(self._next_after(unit))
        self._current = unit
        return time.perf_counter() - start

    # -- calls -------------------------------------------------------------------------

    def __call__(self, feeds: dict[str, torch.Tensor], timestep: torch.Tensor, selector=None) -> torch.Tensor:
        """Run one UNet call. ``feeds``: the graph inputs but the selector, batch first;
        ``timestep``: (B,) the per-sample timesteps (the graph's ``timestep`` feed may be a
        cast of it); ``selector``: (B,) int32 selector values for a batch that mixes
        subjects (default: the dispatch's value of each sample's interval). Returns the
        noise prediction (B, C, h, w)."""
        intervals = self.intervals.index(timestep).tolist()  # (B,)
        units = [self.runner_of_interval[k] for k in intervals]
        if selector is not None:
            feeds = {**feeds, self.dispatch.selector: torch.as_tensor(selector, dtype=torch.int32)}
        elif self.dispatch is not None:
            feeds = {**feeds, **self.dispatch.selector_feed(intervals)}
        batch, out = len(units), None
        for unit in dict.fromkeys(units):
            rows = [i for i, u in enumerate(units) if u == unit]
            part = feeds if len(rows) == batch else {n: v[rows] for n, v in feeds.items()}
            previous, switch = self._current, self._acquire(unit)
            start = time.perf_counter()
            result = run_in_batches(self.runners[unit], part, self.output, self.constants)
            self._record(timestep[rows], [intervals[i] for i in rows], unit, time.perf_counter() - start, switch,
                         switch is not None and previous is not None)
            if len(rows) == batch:
                return result
            if out is None:
                out = result.new_empty((batch, *result.shape[1:]))
            out[rows] = result
        return out

    def _record(self, timesteps, intervals, unit, seconds, switch, switched) -> None:
        self.history.append(engine_call(timesteps, intervals, self.runners[unit].name, seconds, switch or 0.0,
                                        switched))

    def summary(self) -> dict:
        """The recorded calls as a JSON-able dict (see :func:`summarize`)."""
        return summarize(self.history)


def engine_call(timesteps, intervals: list[int], engine: str, seconds: float, switch: float = 0.0,
                switched: bool = False) -> EngineCall:
    """The record of one call; timestep and interval are scalars when the batch shares them."""
    t = [float(x) for x in timesteps.tolist()]
    same = len(set(intervals)) == 1 and len(set(t)) == 1
    return EngineCall(t[0] if same else t, intervals[0] if same else intervals, engine, seconds, switch, switched)


def run_in_batches(runner, feeds: dict[str, torch.Tensor], output: str, constants: dict | None = None) -> torch.Tensor:
    """``runner.infer`` for any batch: a runner with a fixed ``batch`` (a static TensorRT
    engine) gets chunks of that size, the last one padded by repeating its final sample.
    ``constants`` go with every chunk as they are (no batch dimension)."""
    constants = constants or {}
    fixed = getattr(runner, "batch", None)
    n = next(iter(feeds.values())).shape[0]
    if fixed is None or fixed == n:
        return runner.infer({**feeds, **constants}, check_inputs=False)[output]
    parts = []
    for start in range(0, n, fixed):
        chunk = {k: v[start:start + fixed] for k, v in feeds.items()}
        size = next(iter(chunk.values())).shape[0]
        if size < fixed:
            chunk = {k: torch.cat([v, v[-1:].expand(fixed - size, *v.shape[1:])]) for k, v in chunk.items()}
        parts.append(runner.infer({**chunk, **constants}, check_inputs=False)[output][:size])
    return torch.cat(parts)


def summarize(calls: list[EngineCall]) -> dict:
    """What an image record says about its UNet calls.

    Returns:
        ``interval_per_step``, ``timesteps``, ``engine_per_step``, ``unet_seconds_per_step``
        (lists, one entry per call), ``engine_calls`` (interval -> calls, keys as strings),
        ``switches`` and ``switch_seconds_total``.
    """
    counts = Counter()
    for call in calls:
        counts.update(set(call.interval) if isinstance(call.interval, list) else [call.interval])
    return {
        "interval_per_step": [c.interval for c in calls],
        "timesteps": [c.timestep for c in calls],
        "engine_per_step": [c.engine for c in calls],
        "unet_seconds_per_step": [c.seconds for c in calls],
        "engine_calls": {str(k): counts[k] for k in sorted(counts)},
        "switches": sum(c.switched for c in calls),
        "switch_seconds_total": sum(c.switch_seconds for c in calls),
    }


def _dedupe(units) -> list[int]:
    """Drop consecutive repeats: the order in which engines are needed."""
    order = []
    for unit in units:
        if not order or order[-1] != unit:
            order.append(unit)
    if len(order) > 1 and order[0] == order[-1]:
        order.pop()  # the plan wraps around
    return order

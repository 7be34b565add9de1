"""Progress display for long work, on stderr: a rich progress bar per stage on a terminal,
and off a terminal (logs, CI, ``nohup``) a one-line record every ``QPDEPLOY_PROGRESS_SECONDS``
(default 30) seconds: stage, done/total, rate, eta and the stage's fields (loss...).

Library functions take an optional ``progress`` callable (called once per unit of work);
the CLI creates it with :func:`stage`, so the library never prints by itself.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time


def cli_mode() -> str:
    """The display the CLI uses: "bar" on a terminal, else "lines"."""
    return "bar" if sys.stderr.isatty() else "lines"


@contextlib.contextmanager
def stage(description: str, total: int | None, enabled: bool | str = True):
    """Yield ``advance(n=1, **fields)`` for a progress display of ``total`` units.

    Extra keyword fields (for example ``loss=0.12``) are shown after the bar. ``enabled``:
    False (the callable does nothing, so library code calls it unconditionally), True or
    "bar" (a progress bar), or "lines" (periodic one-line records, see the module doc).
    """
    if not enabled:
        yield lambda n=1, **fields: None
        return
    if enabled == "lines":
        with _lines(description, total) as advance:
            yield advance
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    console = Console(file=sys.stderr)
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields):
            info = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
            bar.update(task, advance=n, info=info)

        yield advance


@contextlib.contextmanager
def _lines(description: str, total: int | None):
    every = float(os.environ.get("QPDEPLOY_PROGRESS_SECONDS", "30"))
    start = last = time.perf_counter()
    done, shown, info = 0, False, {}

    def line(now: float) -> str:
        rate = done / max(now - start, 1e-9)
        eta = f" eta {(total - done) / rate:.0f}s" if total and rate > 0 else ""
        fields = "".join(f" {k} {v:.4g}" if isinstance(v, float) else f" {k} {v}" for k, v in info.items())
        return f"[{description}] {done}/{total if total else '?'} {rate:.3g}/s elapsed {now - start:.0f}s{eta}{fields}"

    def advance(n: int = 1, **fields):
        nonlocal done, last, shown
        done += n
        info.update(fields)
        now = time.perf_counter()
        if now - last >= every:
            print(line(now), file=sys.stderr, flush=True)
            last, shown = now, True

    yield advance
    if shown:  # a stage long enough to report gets its closing line too
        print(line(time.perf_counter()), file=sys.stderr, flush=True)

"""Progress display for long work: one rich progress bar per stage, on stderr.

Library functions take an optional ``progress`` callable (called once per unit of work);
the CLI creates it with :func:`stage`, so the library never prints by itself.
"""

from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def stage(description: str, total: int | None, enabled: bool = True):
    """Yield ``advance(n=1, **fields)`` for a progress bar of ``total`` units.

    Extra keyword fields (for example ``loss=0.12``) are shown after the bar. With
    ``enabled=False`` the callable does nothing, so library code calls it unconditionally.
    """
    if not enabled:
        yield lambda n=1, **fields: None
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

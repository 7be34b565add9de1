"""One place that silences the third-party notices every run would print.

Only known, harmless notices are dropped, each at the logger that emits it, so every other
warning of diffusers, transformers and accelerate still reaches the user. No library is
imported here (``logging.getLogger`` does not import the package), so the CLI can call
:func:`quiet_third_party` before deciding what to load.
"""

from __future__ import annotations

import logging

# (emitting logger, words of the notice, why it is noise for qpdeploy's users)
NOTICES = (
    ("transformers.utils.import_utils", "requires torchvision",
     "image processors qpdeploy never uses fall back to PIL"),
    ("diffusers.models.modeling_utils", "low cpu memory usage because `accelerate` was not found",
     "loading without accelerate: tiny and local models load fast either way"),
    ("diffusers.pipelines.pipeline_utils", "low cpu memory usage because `accelerate` was not found",
     "the same notice when a whole pipeline loads"),
    ("diffusers.models.modeling_utils", "should be kept in float32",
     "from_pipe casts to the dtype the modules already have (a no-op here)"),
    ("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion", "following part of your input was truncated",
     "qpdeploy warns once, in one short line, before the prompt is used"),
    ("diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
     "following part of your input was truncated", "the same for SDXL"),
)


class _DropNotices(logging.Filter):
    def __init__(self, words: tuple[str, ...]):
        super().__init__()
        self.words = words

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(w in message for w in self.words)


def quiet_third_party() -> None:
    """Install the filters (idempotent)."""
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, words, _ in NOTICES:
        by_logger[name] = (*by_logger.get(name, ()), words)
    for name, words in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices(words))

"""The export stage's frozen config (``qpdeploy export``), stored in the deploy manifest."""

from __future__ import annotations

from dataclasses import dataclass

from qpdeploy.config import MAX_BATCH, ConfigBase, check_all, strength_problem

LAYOUTS = ("per-interval", "masked", "multi-expert", "multi-subject")

# Opset 18: per-axis DequantizeLinear exists since opset 13; 18 is the newest opset whose
# Q/DQ and normalization ops every TensorRT 10 release parses, ONNX Runtime runs it, and the
# TorchScript exporter emits it natively. Opset 19/21 only add FP8, INT4 and blocked
# quantization, which we do not need: INT4 bases export as INT8 tensors of the same values.
DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 17, 20  # LayerNormalization .. newest opset of the TorchScript exporter


@dataclass(frozen=True)
class ExportConfig(ConfigBase):
    """Every setting of ``qpdeploy export``.

    Attributes:
        layout: "per-interval", "masked", "multi-expert" or "multi-subject"; None picks
            from the pack's strategy (masked for S1, per-interval for baseline, S2 and no
            pack), and multi-subject when several packs are exported together.
        height, width: image size in pixels the graphs and engines are built for (None: the
            model's own resolution). Spatial shapes are fixed in the ONNX graphs.
        batch: UNet batch of the engines (2: one classifier-free-guidance pair). The ONNX
            graphs keep the batch dimension dynamic; engines are built for exactly this batch.
        opset: ONNX opset of every graph (see ``DEFAULT_OPSET``).
        verify: run every interval of every UNet graph on ONNX Runtime against the torch
            quantized model and record the SQNR (the export fails below ``min_sqnr_db``).
        min_sqnr_db: lowest acceptable ONNX-Runtime-vs-torch SQNR of any interval. A gross
            check: a wrong scale set gives < 10 dB, while float-rounding differences that
            flip single INT8 steps cost up to ~30 dB on tiny test models (nothing at real sizes).
        seed: seed of the verification inputs.
        build_engines: build TensorRT engines with Polygraphy (needs the ``trt`` extra).
        strongly_typed: build strongly typed TensorRT networks (precision from the graph:
            INT8 where Q/DQ say so, FP32 elsewhere) instead of the INT8 + FP16 builder flags.
        max_subjects: multi-subject layout: how many subjects of the export's strategy the
            engines leave room for (their scale-table inputs are built for up to
            ``1 + max_subjects * K`` rows); the ONNX graph itself has no limit.
        pack_strength: how much of each scale pack is exported (``qpdeploy.pack.at_strength``:
            0 the base, 1 the pack as trained; or one value per interval, low-noise first);
            a multi-subject deploy dir gives every
            subject, including those added later, this strength.
    """

    layout: str | None = None
    height: int | None = None
    width: int | None = None
    batch: int = 2
    opset: int = DEFAULT_OPSET
    verify: bool = True
    min_sqnr_db: float = 15.0
    seed: int = 0
    build_engines: bool = False
    strongly_typed: bool = False
    max_subjects: int = 16
    pack_strength: float | tuple[float, ...] = 1.0

    def __post_init__(self):
        checks = [
            (self.layout is None or self.layout in LAYOUTS,
             f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}"),
            (1 <= self.batch <= MAX_BATCH, f"batch must be in 1..{MAX_BATCH}, got {self.batch}"),
            (self.height is None or self.height > 0, f"height must be positive, got {self.height}"),
            (self.width is None or self.width > 0, f"width must be positive, got {self.width}"),
            (MIN_OPSET <= self.opset <= MAX_OPSET, f"opset must be in {MIN_OPSET}..{MAX_OPSET}, got {self.opset}"),
            (1 <= self.max_subjects <= 4096, f"max_subjects must be in 1..4096, got {self.max_subjects}"),
            (strength_problem(self.pack_strength) is None, strength_problem(self.pack_strength)),
        ]
        check_all(checks)

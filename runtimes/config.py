"""The runtime stage's frozen configs: how engines run (:class:`RuntimeConfig`) and how an
image is sampled (:class:`GenerateConfig`). Both are written into every image's JSON record."""

from __future__ import annotations

from dataclasses import dataclass

from qpdeploy.config import MAX_STEPS, ConfigBase, check_all
from qpdeploy.models import FALLBACK_SAMPLING

BACKENDS = ("ort", "trt", "torch")
SCHEDULERS = ("ddim", "pndm", "dpm", "euler")
ORT_OPTIMIZATIONS = ("none", "basic", "extended", "all")


@dataclass(frozen=True)
class RuntimeConfig(ConfigBase):
    """How the UNet (and the float parts) of a deploy dir run.

    Attributes:
        backend: "ort" (ONNX Runtime: CPU, or its CUDA execution provider when
            onnxruntime-gpu and a GPU are present), "trt" (the deploy dir's TensorRT
            engines) or "torch" (the quantized PyTorch UNet with the pack applied: the
            reference; needs ``base`` and, for a personalized deploy dir, ``pack``).
        device: "auto", "cpu" or "cuda[:N]". ort: the execution provider; trt: the GPU;
            torch: where the UNet runs.
        low_memory: keep only the current interval's UNet engine loaded and prepare the
            next one on a background thread, instead of every engine resident.
        threads: ONNX Runtime intra-op threads (0: ONNX Runtime's default, all cores).
        ort_optimization: ONNX Runtime graph optimization level. "basic" (constant folding
            and redundancy elimination) keeps the Q/DQ arithmetic as exported; "extended"
            and "all" add fusions that reorder float math and so round activations
            differently from the torch model.
        fold_weights: ONNX Runtime at "basic": dequantize every INT8 weight into an FP32
            copy when a session loads (ORT's constant folding with its Q/DQ handling off),
            instead of dequantizing on the fly in each call. Faster calls where weights
            dominate the work (small latents, CPU), at four bytes per weight per loaded
            session: the per-interval sessions' scales differ, so the copies cannot be
            shared, and ``share_weights`` then saves nothing. Off, the sessions keep the
            INT8 weights (shared) and compute exactly the unoptimized graph's numbers.
        arena: ONNX Runtime: every session takes its CPU buffers from one memory arena
            shared by the process (:func:`qpdeploy.runtimes.runners.shared_cpu_arena`), so a
            call reuses the last call's memory, whichever session ran it. False: each call
            allocates and frees its buffers (the least memory held between calls; slower,
            and a newly loaded session's first calls slower still).
        share_weights: ONNX Runtime sessions of a per-interval layout read the one shared
            weights file from a single memory map instead of each holding a copy.
        cuda_graph: TensorRT: capture each engine's launch in a CUDA graph (static shapes).
        verify_hashes: check every file of the deploy dir against the manifest's SHA-256
            before loading anything.
        base, pack: torch backend only: the quantized base and scale pack directories the
            deploy dir was exported from (their hashes are checked against the manifest).
    """

    backend: str = "ort"
    device: str = "auto"
    low_memory: bool = False
    threads: int = 0
    ort_optimization: str = "basic"
    fold_weights: bool = False
    arena: bool = True
    share_weights: bool = True
    cuda_graph: bool = False
    verify_hashes: bool = True
    base: str | None = None
    pack: str | None = None

    def __post_init__(self):
        check_all([
            (self.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}"),
            (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
             f"device must be auto, cpu or cuda[:N], got {self.device!r}"),
            (self.threads >= 0, f"threads must be >= 0, got {self.threads}"),
            (self.ort_optimization in ORT_OPTIMIZATIONS,
             f"ort optimization must be one of {', '.join(ORT_OPTIMIZATIONS)}, got {self.ort_optimization!r}"),
            (not self.fold_weights or (self.backend == "ort" and self.ort_optimization == "basic"),
             "fold weights applies to the ort backend at ort optimization basic (at none nothing is folded; "
             "extended and all run fused INT8 kernels on the INT8 weights)"),
            (self.arena or self.backend == "ort", "the memory arena setting applies to the ort backend only"),
            (self.backend == "torch" or (self.base is None and self.pack is None),
             "base and pack directories are only used by the torch backend"),
            (self.backend != "torch" or self.base is not None,
             "the torch backend runs the quantized PyTorch UNet, which a deploy dir does not hold: "
             "give the base it was exported from (--base BASE, and --pack PACK if it was personalized)"),
        ])


@dataclass(frozen=True)
class GenerateConfig(ConfigBase):
    """How images are sampled (``qpdeploy generate``).

    Attributes:
        steps: denoising steps (``num_inference_steps``).
        guidance: classifier-free guidance scale (<= 1: no guidance, one UNet sample per step).
        scheduler: "ddim", "pndm" (PLMS, PRK steps skipped as in SD's own config), "dpm"
            (DPM-Solver++ multistep), "euler" (Euler discrete), or None: the deploy dir's own.
        seed: seed of image 0; image i of a run uses ``seed + i``.
        images_per_prompt: images generated for each prompt.
        negative_prompt: the negative prompt (None: the pipeline's default, empty).
        height, width: image size; None: the size the deploy dir was exported for, and
            any other size is refused (the graphs have fixed spatial shapes).
        subject: in a multi-subject deploy dir, the subject (identifier word) whose scale
            sets the UNet uses; None: the post-training scales.
    """

    steps: int = FALLBACK_SAMPLING["steps"]
    guidance: float = FALLBACK_SAMPLING["guidance"]
    scheduler: str | None = None
    seed: int = 0
    images_per_prompt: int = 1
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    subject: str | None = None

    def __post_init__(self):
        check_all([
            (1 <= self.steps <= MAX_STEPS, f"steps must be in 1..{MAX_STEPS}, got {self.steps}"),
            (self.guidance >= 0, f"guidance must be >= 0, got {self.guidance}"),
            (self.scheduler is None or self.scheduler in SCHEDULERS,
             f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (1 <= self.images_per_prompt <= 10_000, f"images per prompt must be in 1..10000, got {self.images_per_prompt}"),
            (self.height is None or self.height > 0, f"height must be positive, got {self.height}"),
            (self.width is None or self.width > 0, f"width must be positive, got {self.width}"),
        ])

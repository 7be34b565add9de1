"""Training memory of DreamBooth personalization: full fine-tuning, LoRA, and scale training.

On the Stable Diffusion 1.5 UNet architecture (built from its config, random weights, no
download), fp32, batch 1, one full training step (noise-prediction loss, backward, AdamW
step) per method, each method in its own process, one after the other:

- ``full_finetune``: every UNet weight trains with AdamW (what diffusers' DreamBooth does);
- ``lora_r4``: LoRA rank 4 on the attention projections to_q/to_k/to_v/to_out.0 (peft,
  as in diffusers' train_dreambooth_lora.py);
- ``textual_inversion``: only the identifier's token embedding row trains; the frozen float
  UNet and the frozen SD 1.5 CLIP text encoder (built from its config) stay in memory, since
  the prompt goes through the trainable row at every step;
- ``qlora_r4_int8``: the same LoRA on qpdeploy's frozen W8A8 base (peft's LoRA linear wraps
  qpdeploy's ``QuantLinear``; the integer weights stay integer in memory);
- ``ours_baseline_int8``, ``ours_s2_int8``, ``ours_s2_int8_gc``, ``ours_s2_int4``: qpdeploy's
  own training step (:class:`qpdeploy.train.ScaleTrainer`) on a quantized base loaded from
  disk, with the training defaults (output and input scales; S2 with K = 2) and batch 1;
  ``_gc`` adds gradient checkpointing (``--gradient-checkpointing``), ``_lowmem`` is
  ``qpdeploy train --low-memory`` (checkpointing, and on CPU large freed blocks go back to
  the OS at once: :func:`qpdeploy.memory.cap_heap_retention`); ``ours_s2_int8_float_gemm`` is
  ``ours_s2_int8`` with the layers' integer forward turned off (``QPDEPLOY_INT8_GEMM=0``): on a
  CPU with an exact int8 GEMM (VNNI, AMX) the two differ, elsewhere they are the same code.

The quantized bases are built once in a helper process (``--prepare-base``) with min/max
weight scales and a minimal activation calibration on 4 random UNet calls: this benchmark
measures memory and time, not quality.

Peak memory is the CUDA max allocated on a GPU and, on a CPU, the process's peak resident
memory over the training steps (high-water mark reset after model loading, so loading a
file does not count; the setup figures are reported separately). Each method also reports
where its memory goes: weights and buffers, trainable state (parameters, gradients, AdamW
moments) and the tensors autograd saves for backward (counted with saved-tensor hooks).

    python benchmarks/train_memory.py --out benchmarks/results/train_memory.json

With a GPU the same script measures 32x32 and 64x64 latents. ``--speed-rounds N`` then times
``ours_s2_int8``, ``lora_r4`` and ``ours_s2_int8_float_gemm`` again, in rotating order, N
rounds; on a CPU every timed run
also profiles one more step (after the timing) and reports its CPU time by kind of operator:
convolutions/matmuls/attention, copies (for ours, integer weights and sums converted to float),
elementwise passes, the rest.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

import torch

# Stable Diffusion 1.5's UNet configuration (its published unet/config.json), 859.5M parameters.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", clip_sample=False)
TEXT_TOKENS, TEXT_WIDTH = 77, 768

# SD 1.5's text encoder (CLIP ViT-L/14 text tower), for textual inversion
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
IDENTIFIER_ID = 42_000  # the identifier's token id in the synthetic prompt (any id of the vocabulary)

# method: (kind, weight bits of the quantized base or None, ScaleTrainer options)
METHODS = {
    "full_finetune": ("float", None, {}),
    "lora_r4": ("float", None, {}),
    "textual_inversion": ("float", None, {}),
    "qlora_r4_int8": ("qlora", 8, {}),
    "ours_baseline_int8": ("ours", 8, {"strategy": "baseline"}),
    "ours_s2_int8": ("ours", 8, {"strategy": "s2"}),
    "ours_s2_int8_gc": ("ours", 8, {"strategy": "s2", "gradient_checkpointing": True}),
    "ours_s2_int8_lowmem": ("ours", 8, {"strategy": "s2", "gradient_checkpointing": True, "low_memory": True}),
    "ours_s2_int4": ("ours", 4, {"strategy": "s2"}),
    "ours_s2_int8_float_gemm": ("ours", 8, {"strategy": "s2", "float_gemm": True}),
}
WORKER_ONLY = ("low_memory", "float_gemm")  # options the worker process applies, not ScaleTrainer
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # what fidelity.add_lora targets (named in the report)
LR = {"full_finetune": 5e-6, "lora_r4": 1e-4, "qlora_r4_int8": 1e-4, "textual_inversion": 5e-4}


# --------------------------------------------------------------------------------------
# Measurements shared by the workers
# --------------------------------------------------------------------------------------

def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in chain(module.parameters(), module.buffers()))


def saved_for_backward(forward, modules) -> dict:
    """Bytes autograd saves for backward in ``forward()``, by dtype, excluding the modules'
    own parameters and buffers (saving those costs nothing)."""
    own = {t.untyped_storage().data_ptr() for m in modules for t in chain(m.parameters(), m.buffers())}
    seen: dict[int, tuple[int, str]] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = (storage.nbytes(), str(t.dtype).removeprefix("torch."))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    del loss
    by_dtype: dict[str, int] = {}
    for nbytes, dtype in seen.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    return {"total": sum(by_dtype.values()), "by_dtype": by_dtype}


def allocator_free_bytes() -> int | None:
    """Bytes glibc's heap holds free but has not returned to the OS (fragmentation), or None."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        return int(libc.mallinfo2().fordblks)
    except (OSError, AttributeError):
        return None


# Where a step's CPU time goes, by kind of operator (self time of torch.profiler's aten ops)
OP_KINDS = {
    "convolution, matmul, attention": ("aten::convolution_backward", "aten::mkldnn_convolution",
                                       "aten::_slow_conv2d", "aten::mm", "aten::addmm", "aten::bmm",
                                       "aten::_scaled_dot_product", "aten::_int_mm"),
    "copies (ours: integer weights and sums to float)": ("aten::copy_",),
    "elementwise and small reductions": ("aten::mul", "aten::add", "aten::addcmul", "aten::div", "aten::round",
                                         "aten::clamp", "aten::eq", "aten::ge", "aten::le", "aten::sum", "aten::cat",
                                         "aten::stack", "aten::sub", "aten::where", "aten::bitwise_and",
                                         "aten::logical_and"),
}


def profile_step(step) -> dict:
    """Self CPU seconds of one more training step by :data:`OP_KINDS` (the rest is "other"),
    and the ten costliest operators; profiled after the timed steps, so timing is unaffected."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    kinds = {kind: 0.0 for kind in (*OP_KINDS, "other")}
    for event in events:
        # an op name matches a prefix exactly or followed by "_" (aten::mul_, aten::_slow_conv2d_forward)
        kind = next((k for k, names in OP_KINDS.items()
                     if any(event.key == n or event.key.startswith(n + "_") for n in names)), "other")
        kinds[kind] += event.self_cpu_time_total / 1e6
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]
    return {"self_seconds_by_kind": {k: round(v, 4) for k, v in kinds.items()},
            "top_ops": {e.key: {"self_seconds": round(e.self_cpu_time_total / 1e6, 4), "calls": e.count} for e in top}}


def synthetic_batch(latent: int, device, width: int = TEXT_WIDTH):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, latent, latent, generator=g)
    noise = torch.randn(1, 4, latent, latent, generator=g)
    context = torch.randn(1, TEXT_TOKENS, width, generator=g)
    return latents.to(device), noise.to(device), context.to(device)


def float_step_fn(unet, optimizer, latent: int, device, encoder=None):
    """A diffusers-DreamBooth training step (noise loss, backward, AdamW) on a UNet; with
    ``encoder`` (textual inversion) the prompt is encoded through it at every step."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    schedule = DDPMScheduler.from_config(SD15_SCHEDULER)
    latents, noise, context = synthetic_batch(latent, device, unet.config.cross_attention_dim)
    counter = iter(range(10**9))

    def forward():
        t = torch.tensor([(137 * next(counter)) % 1000], device=device)
        noisy = schedule.add_noise(latents, noise, t)
        embeds = context if encoder is None else encoder()
        pred = unet(noisy, t, encoder_hidden_states=embeds, return_dict=False)[0]
        return F.mse_loss(pred.float(), noise.float())

    def step():
        forward().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return forward, step


# --------------------------------------------------------------------------------------
# Workers (one process per method)
# --------------------------------------------------------------------------------------

def build_float(method: str, device, unet_config: dict = SD15_UNET, text_config: dict = SD15_TEXT):
    """The float UNet with what ``method`` trains; returns (unet, params, optimizer, encoder),
    ``encoder`` being textual inversion's prompt encoder (else None)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config).to(device)
    unet.train()
    encoder = None
    if method == "full_finetune":
        params = list(unet.parameters())
    else:
        unet.requires_grad_(False)
    if method == "lora_r4":
        add_lora(unet)
        params = [p for p in unet.parameters() if p.requires_grad]
    elif method == "textual_inversion":
        encoder = PromptThroughRow(text_config, device)
        params = [encoder.row]
    return unet, params, torch.optim.AdamW(params, lr=LR[method]), encoder


class PromptThroughRow(torch.nn.Module):
    """Textual inversion's prompt encoder: the frozen text encoder, whose embedding table
    gives the identifier's token a trainable row (a forward hook, as
    :class:`qpdeploy.token.TokenTuner` does); calling it encodes a fixed 77-token prompt."""

    def __init__(self, text_config: dict, device):
        from transformers import CLIPTextConfig, CLIPTextModel

        super().__init__()
        torch.manual_seed(1)
        self.encoder = CLIPTextModel(CLIPTextConfig(**text_config)).to(device).requires_grad_(False)
        identifier = min(IDENTIFIER_ID, text_config["vocab_size"] - 2)
        table = self.encoder.get_input_embeddings()
        self.row = torch.nn.Parameter(table.weight[identifier].detach().clone())
        ids = torch.full((1, TEXT_TOKENS), text_config["vocab_size"] - 1, device=device)  # padding
        ids[0, :6] = torch.tensor([0, 320, 1125, 539, identifier, 1929]) % text_config["vocab_size"]
        self.ids, at_identifier = ids, (ids == identifier).unsqueeze(-1)
        table.register_forward_hook(lambda module, args, out: torch.where(at_identifier, self.row.to(out.dtype), out))

    def forward(self):
        return self.encoder(self.ids).last_hidden_state


def add_lora(unet) -> None:
    """The fidelity benchmark's LoRA (peft, r4 on LORA_TARGETS), on a float or a quantized UNet."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.fidelity import add_lora as fidelity_add_lora

    fidelity_add_lora(unet)


def build_qlora(base_dir: Path, device):
    """LoRA r4 (peft) on the frozen quantized base: returns (unet, params, optimizer)."""
    from qpdeploy.base import load_base

    unet = load_base(base_dir, device).unet
    unet.requires_grad_(False)
    add_lora(unet)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    return unet, params, torch.optim.AdamW(params, lr=LR["qlora_r4_int8"])


def float_artifact(method: str, unet, params: list, folder: Path) -> int:
    """Bytes of what the method ships: the UNet, the LoRA weights, or the embedding row."""
    from safetensors.torch import save_file

    if method in ("lora_r4", "qlora_r4_int8"):
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(unet)
    elif method == "textual_inversion":
        state = {"identifier": params[0]}
    else:
        state = unet.state_dict()
    path = folder / f"{method}.safetensors"
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))
    size = path.stat().st_size
    path.unlink()
    return size


def build_ours(method: str, base_dir: Path, latent: int, steps: int, device):
    from qpdeploy.base import load_base
    from qpdeploy.config import TrainConfig
    from qpdeploy.data import Examples
    from qpdeploy.train import ScaleTrainer

    base = load_base(base_dir)
    latents, _, context = synthetic_batch(latent, "cpu", base.unet.config.cross_attention_dim)
    examples = Examples(latent_mean=latents, latent_std=torch.zeros_like(latents), prompt_index=torch.tensor([0]),
                        is_prior=torch.tensor([False]), prompt_embeds=context)
    # the training defaults (strategy's K, output and input scales), batch 1 like every method here
    options = {k: v for k, v in METHODS[method][2].items() if k not in WORKER_ONLY}
    config = TrainConfig("a photo of sks dog", **options, batch_size=1, steps=steps)
    trainer = ScaleTrainer(base, examples, config, SD15_SCHEDULER, device)
    return base, trainer


def worker(args) -> dict:
    from qpdeploy.memory import PeakMemory, cap_heap_retention, rss_bytes

    if METHODS[args.worker][2].get("low_memory") and args.device == "cpu":
        cap_heap_retention()  # first thing, as the train command does
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    import diffusers  # noqa: F401  (import cost belongs to the runtime, for every method alike)

    runtime_rss = rss_bytes()
    kind = METHODS[args.worker][0]
    unet_config, text_config = (json.loads(args.configs.read_text()) if args.configs else (SD15_UNET, SD15_TEXT))
    if kind != "ours":
        encoder = None
        if kind == "qlora":
            unet, params, optimizer = build_qlora(args.base, device)
        else:
            unet, params, optimizer, encoder = build_float(args.worker, device, unet_config, text_config)
        forward, step = float_step_fn(unet, optimizer, args.latent, device, encoder)
        model, trainable = unet, sum(p.numel() for p in params)
        models = [unet] + ([encoder] if encoder is not None else [])
    else:
        base, trainer = build_ours(args.worker, args.base, args.latent, args.steps, device)
        model = trainer.unet

        def forward():
            return trainer.loss(trainer.make_batch(10_000))

        step = trainer.train_step
        trainable = trainer.optimizer.size * trainer.optimizer.num_sets
        models = [model]
    gc.collect()
    setup_rss = rss_bytes()
    weights = sum(module_bytes(m) for m in models)

    memory = PeakMemory(device).reset()
    times = []
    for _ in range(args.steps):
        tick = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tick)
    peak = memory.peak()
    heap_free = allocator_free_bytes() if device.type == "cpu" else None
    profiled = profile_step(step) if args.profile else None

    # after the measurement: where the memory goes, and the artifact
    saved = saved_for_backward(forward, models)
    if kind != "ours":
        state = optimizer.state_dict()["state"].values()
        trainable_state = sum(p.numel() * p.element_size() * 2 for p in params)  # parameters + gradients
        trainable_state += sum(v.numel() * v.element_size() for s in state for v in s.values() if torch.is_tensor(v))
        artifact = float_artifact(args.worker, model, params, Path(args.workdir))
    else:
        from qpdeploy.pack import save_pack

        opt = trainer.optimizer
        tables = sum(t.numel() for layer in opt.layers for t in (layer.s_out, layer.s_in) if t is not None)
        trainable_state = 4 * (2 * tables + opt.size * opt.num_sets * 3)  # tables + grads, deltas + 2 moments
        trainer.finish()
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            path = save_pack(Path(tmp) / "pack", trainer.pack(), {"benchmark": True})
            artifact = json.loads((path / "report.json").read_text())["pack_bytes"]
    return {
        "peak_memory_bytes": peak,
        "trainable_params": trainable,
        "artifact_bytes": artifact,
        "seconds_per_step": sum(times[1:]) / max(1, len(times) - 1),
        "first_step_seconds": times[0],
        "peak_memory_kind": memory.kind,
        **({"profile": profiled} if profiled else {}),
        "breakdown": {
            "runtime_rss_bytes": runtime_rss if device.type == "cpu" else None,
            "setup_rss_bytes": setup_rss if device.type == "cpu" else None,
            "weights_and_buffers_bytes": weights,
            "trainable_state_bytes": trainable_state,
            "saved_for_backward_bytes": saved["total"],
            "saved_for_backward_by_dtype": saved["by_dtype"],
            "allocator_free_bytes_after_steps": heap_free,
        },
    }


# --------------------------------------------------------------------------------------
# The quantized bases (built once, in their own process: the float UNet is 3.4 GB)
# --------------------------------------------------------------------------------------

def prepare_base(bits: int, out: Path, threads: int, unet_config: dict = SD15_UNET) -> None:
    """A quantized base of a random UNet of ``unet_config`` (memory and time only)."""
    from diffusers import UNet2DConditionModel

    from qpdeploy.base import QuantizedBase, base_meta, save_base
    from qpdeploy.calibrate import UNetCall, calibrate_activations
    from qpdeploy.config import QuantizeConfig
    from qpdeploy.qunet import convert_unet, float_weights_of, plan_layers, quantize_weights

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config).eval()
    config = QuantizeConfig(weight_bits=bits, weight_search="minmax", act_search="minmax", calib_samples=4)
    intervals = config.make_intervals(1000)
    plans = plan_layers(unet, config)
    weights = float_weights_of(unet, plans)
    convert_unet(unet, config, intervals, plans)
    quantize_weights(unet, weights, config)
    del weights
    gc.collect()
    g = torch.Generator().manual_seed(1)
    calls = [UNetCall((torch.randn(1, 4, 32, 32, generator=g), torch.tensor([t])),
                      {"encoder_hidden_states": torch.randn(1, TEXT_TOKENS, unet.config.cross_attention_dim,
                                                            generator=g)}, t, i, 0)
             for i, t in enumerate((100, 350, 600, 850))]
    calibrate_activations(unet, calls, config, "cpu")
    report = {"note": "random SD 1.5 UNet; min/max weight scales; activations calibrated on 4 random calls"}
    # no source pipeline (no text encoder or VAE): the source hash names the architecture
    architecture = hashlib.sha256(json.dumps(unet_config, sort_keys=True).encode()).hexdigest()
    meta = base_meta(plans, {"kind": "benchmark", "name": "sd15-random"}, architecture)
    save_base(out, QuantizedBase(unet, config, intervals, meta), report, force=True)


# --------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------

def run_method(method: str, latent: int, args, base_dirs: dict, profile: bool = False) -> dict:
    result = Path(args.workdir) / f"{method}-{latent}.json"
    command = [sys.executable, __file__, "--worker", method, "--latent", str(latent), "--steps", str(args.steps),
               "--device", args.device, "--threads", str(args.threads), "--workdir", str(args.workdir),
               "--result", str(result)] + (["--profile"] if profile else [])
    if METHODS[method][1] is not None:
        command += ["--base", str(base_dirs[METHODS[method][1]])]
    print(f"[{time.strftime('%H:%M:%S')}] {method} at {latent}x{latent} latents ...", flush=True)
    env = dict(os.environ)
    if METHODS[method][2].get("float_gemm"):
        from qpdeploy.layers import INT_GEMM_ENV

        env[INT_GEMM_ENV] = "0"
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    subprocess.run(command, check=True, env=env)
    data = json.loads(result.read_text())
    print(f"    peak {data['peak_memory_bytes'] / 2**30:.2f} GiB, {data['seconds_per_step']:.1f} s/step", flush=True)
    return data


SPEED_METHODS = ("ours_s2_int8", "lora_r4", "ours_s2_int8_float_gemm")


def speed_rounds(args, base_dirs: dict) -> dict:
    """Seconds per step of ours S2 INT8 (integer forward where exact, and float GEMMs) against
    LoRA r4, in an order that rotates each round, round by round."""
    from qpdeploy.layers import int_gemm_available
    from qpdeploy.miniworld.stats import bootstrap_mean

    seconds = {m: [] for m in SPEED_METHODS}
    profiles = {m: [] for m in SPEED_METHODS}
    for r in range(args.speed_rounds):
        shift = r % len(SPEED_METHODS)
        for method in SPEED_METHODS[shift:] + SPEED_METHODS[:shift]:
            data = run_method(method, 32, args, base_dirs, profile=args.device == "cpu")
            seconds[method].append(data["seconds_per_step"])
            if "profile" in data:
                profiles[method].append(data["profile"]["self_seconds_by_kind"])

    def ratio(a, b):
        return bootstrap_mean([[x / y for x, y in zip(seconds[a], seconds[b])]])

    report = {"rounds": args.speed_rounds, "seconds_per_step": seconds,
              "integer_forward": args.device == "cpu" and int_gemm_available(),
              "ours_s2_int8 / lora_r4": ratio("ours_s2_int8", "lora_r4"), "target": "<= 1",
              "ours_s2_int8_float_gemm / lora_r4": ratio("ours_s2_int8_float_gemm", "lora_r4"),
              "ours_s2_int8 / ours_s2_int8_float_gemm": ratio("ours_s2_int8", "ours_s2_int8_float_gemm")}
    if all(profiles.values()):  # one profiled step after each timed run, mean over the rounds
        report["profile_self_seconds_by_kind"] = {
            m: {k: round(sum(p[k] for p in runs) / len(runs), 3) for k in runs[0]} for m, runs in profiles.items()}
    return report


def ratios(methods: dict) -> dict:
    def r(a, b):
        if a in methods and b in methods:
            return round(methods[a]["peak_memory_bytes"] / methods[b]["peak_memory_bytes"], 4)
        return None

    return {
        "ours_s2_int8 / full_finetune": r("ours_s2_int8", "full_finetune"),
        "ours_s2_int8 / lora_r4": r("ours_s2_int8", "lora_r4"),
        "ours_s2_int4 / ours_s2_int8": r("ours_s2_int4", "ours_s2_int8"),
        "ours_baseline_int8 / full_finetune": r("ours_baseline_int8", "full_finetune"),
        "ours_baseline_int8 / lora_r4": r("ours_baseline_int8", "lora_r4"),
        "ours_s2_int4 / full_finetune": r("ours_s2_int4", "full_finetune"),
        "ours_s2_int4 / lora_r4": r("ours_s2_int4", "lora_r4"),
        "lora_r4 / full_finetune": r("lora_r4", "full_finetune"),
    }


def targets(rat: dict) -> dict:
    def check(value, limit, strict=False):
        return None if value is None else (value < limit if strict else value <= limit)

    return {
        "ours_s2_int8 <= 0.2 x full_finetune": check(rat["ours_s2_int8 / full_finetune"], 0.2),
        "ours_s2_int8 <= 0.6 x lora_r4": check(rat["ours_s2_int8 / lora_r4"], 0.6),
        "ours_s2_int4 < ours_s2_int8": check(rat["ours_s2_int4 / ours_s2_int8"], 1.0, strict=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="JSON report to write")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--steps", type=int, default=3, help="training steps per method (the first is not timed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--workdir", type=Path, default=None, help="where bases and artifacts go (default: a temp dir)")
    parser.add_argument("--speed-rounds", type=int, default=0,
                        help="then time lora_r4 and ours_s2_int8 again, alternating, this many rounds: the per-round "
                             "ratio of seconds per step with a 95%% interval (robust to a machine whose load drifts)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None,
                        help="run every method with glibc's MALLOC_MMAP_THRESHOLD_ set to this many bytes (a control "
                             "for allocator retention: large blocks are returned to the OS as soon as they are freed)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)  # profile a step after timing
    parser.add_argument("--latent", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prepare-base", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--configs", type=Path, help=argparse.SUPPRESS)  # [unet, text] configs (tests)
    args = parser.parse_args()

    if args.worker:
        args.result.write_text(json.dumps(worker(args)))
        return
    if args.prepare_base:
        prepare_base(args.prepare_base, args.base, args.threads)
        return
    if args.out is None:
        parser.error("--out is required")
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}")
    own_tmp = args.workdir is None
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="train-memory-"))
    args.workdir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    base_dirs = {}
    speed_methods = SPEED_METHODS if args.speed_rounds else ()
    for bits in sorted({METHODS[m][1] for m in (*methods, *speed_methods) if METHODS[m][1] is not None}):
        base_dirs[bits] = args.workdir / f"base-int{bits}"
        if not (base_dirs[bits] / "quant_config.json").is_file():
            print(f"[{time.strftime('%H:%M:%S')}] quantizing the random SD 1.5 UNet to INT{bits} ...", flush=True)
            subprocess.run([sys.executable, __file__, "--prepare-base", str(bits), "--base", str(base_dirs[bits]),
                            "--threads", str(args.threads)], check=True)
    latents = [32, 64] if args.device.startswith("cuda") else [32]
    measured = {latent: {m: run_method(m, latent, args, base_dirs) for m in methods} for latent in latents}

    report = {"ratios": ratios(measured[32]), "targets": targets(ratios(measured[32])), "methods": measured[32]}
    if args.speed_rounds:
        report["speed"] = speed_rounds(args, base_dirs)
    if 64 in measured:
        report.update({"ratios_64": ratios(measured[64]), "methods_64": measured[64]})
    report["setup"] = {
        "model": "Stable Diffusion 1.5 UNet architecture, random weights (config in this script)",
        "unet_parameters": 859_520_964,
        "latent": "32x32 (and 64x64 on CUDA)",
        "batch": 1,
        "dtype": "fp32",
        "device": args.device,
        "threads": args.threads,
        "steps_per_method": args.steps,
        "peak_memory": "CUDA max allocated" if args.device.startswith("cuda") else
                       "process peak RSS during the training steps (high-water mark reset after setup)",
        "quantized_bases": "min/max weight scales, activation scales from 4 random UNet calls (memory/time only, "
                           "not quality)",
        "lora": f"peft LoRA r=4 alpha=4 on {', '.join(LORA_TARGETS)}",
        "ours": "qpdeploy ScaleTrainer with the training defaults (s_out and s_in, AdamW per scale set; S2: K=2 "
                "sets), batch 1",
        "allocator": ("glibc default" if not args.malloc_mmap_threshold else
                      f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold} for every method"),
        "torch": torch.__version__,
        "seconds_total": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"ratios": report["ratios"], "targets": report["targets"]}, indent=2))
    if own_tmp:
        import shutil

        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

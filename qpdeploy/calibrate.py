"""Q-Diffusion-style calibration data and activation ranges.

1. :func:`capture_trajectories` runs the full-precision pipeline (DDIM, classifier-free
   guidance) on calibration prompts and records every UNet call: latents, timestep, text
   embeddings (cond and uncond in one batch) and, for SDXL, the added conditions.
2. :func:`spread_over_schedule` keeps calls spread evenly over the whole schedule
   (timestep-aware calibration), cycling through prompts.
3. :func:`calibrate_activations` runs those calls through the weight-quantized UNet with
   activation quantization off, keeps a seeded random sample of each quantized layer's
   input values per timestep interval and per channel group (shortcut splitting), and
   searches per tensor the clipping range that minimises the L_p quantization error.
4. :func:`sqnr_db` / :func:`sqnr_by_interval` score the quantized UNet against the float
   one on held-out calls.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .layers import ACT_QMAX, ACT_QMIN, QuantConv2d, quant_layers
from .memory import release_free_heap


@dataclass
class UNetCall:
    """One recorded UNet call: positional/keyword arguments, on the CPU, plus its origin, and
    (when recorded with ``outputs=True``) the float UNet's own output of that call."""

    args: tuple
    kwargs: dict
    timestep: float
    step: int
    prompt: int
    output: torch.Tensor | None = None

    def to(self, device) -> tuple[tuple, dict]:
        """The call's arguments moved to ``device``."""
        return tree_to(self.args, device), tree_to(self.kwargs, device)


def tree_to(obj, device):
    """``obj`` (a tensor, or dicts, lists and tuples of them) with every tensor moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: tree_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree_to(v, device) for v in obj)
    return obj


_KEEP_KWARGS = ("encoder_hidden_states", "added_cond_kwargs", "timestep_cond", "class_labels")


class _TrajectoryDone(Exception):
    """Raised by the recording hook once a trajectory has no more calls to keep."""


@torch.no_grad()
def capture_trajectories(pipe, prompts, steps: int, guidance: float, resolution: int | None,
                         seed: int, progress=None, keep: int | None = None, outputs: bool = False) -> list[UNetCall]:
    """Run the float pipeline on each prompt and record every UNet call.

    Args:
        pipe: a diffusers text-to-image pipeline (its scheduler is swapped for DDIM).
        prompts: one trajectory per prompt, seeded with ``seed + index``.
        steps, guidance, resolution: DDIM steps, CFG scale, image size (None: model default).
        progress: optional callable invoked once per trajectory.
        keep: record only the calls ``spread_over_schedule(all_calls, keep)`` would pick
            (None: all). A trajectory stops after the last call it contributes, and a prompt
            that contributes none is not run, so the result is exactly that selection, in its
            order, at a fraction of the cost.
        outputs: also keep each recorded call's output (float32, CPU) as ``call.output``: the
            reference a held-out evaluation needs, without running those calls again.

    Returns:
        The recorded calls, in (prompt, step) order (with ``keep``: in
        :func:`spread_over_schedule`'s order).
    """
    from diffusers import DDIMScheduler

    wanted = None if keep is None else schedule_picks(len(prompts), steps, keep)
    last: dict[int, int] = {}  # prompt -> its last kept step
    for prompt, step in wanted or ():
        last[prompt] = max(last.get(prompt, step), step)
    original_scheduler = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    calls: list[UNetCall] = []
    state = {"prompt": 0, "step": 0}

    def record(_module, args, kwargs):
        if wanted is not None and (state["prompt"], state["step"]) not in wanted:
            if state["step"] > last[state["prompt"]]:
                raise _TrajectoryDone
            state["step"] += 1
            return
        kept = {k: v for k, v in kwargs.items() if k in _KEEP_KWARGS and v is not None}
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        sample = args[0] if args else kwargs["sample"]
        calls.append(UNetCall((tree_to(sample, "cpu").clone(), tree_to(torch.as_tensor(timestep), "cpu")),
                              tree_to(kept, "cpu"), float(torch.as_tensor(timestep).float().mean()),
                              state["step"], state["prompt"]))
        state["step"] += 1
        state["pending"] = calls[-1]

    def keep_output(_module, _args, _kwargs, output):
        call, state["pending"] = state.pop("pending", None), None
        if call is not None:
            call.output = (output[0] if isinstance(output, tuple) else output.sample).detach().float().cpu().clone()

    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    out_handle = pipe.unet.register_forward_hook(keep_output, with_kwargs=True) if outputs else None
    size = {} if resolution is None else {"height": resolution, "width": resolution}
    try:
        pipe.set_progress_bar_config(disable=True)
        for i, prompt in enumerate(prompts):
            state.update(prompt=i, step=0)
            generator = torch.Generator("cpu").manual_seed(seed + i)
            if wanted is None or i in last:
                try:
                    pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                         generator=generator, **size)
                except _TrajectoryDone:
                    pass
            if progress is not None:
                progress()
    finally:
        handle.remove()
        if out_handle is not None:
            out_handle.remove()
        pipe.scheduler = original_scheduler
    return calls if keep is None else spread_over_schedule(calls, keep)


def spread_over_schedule(calls: list[UNetCall], count: int) -> list[UNetCall]:
    """Pick ``count`` calls spread evenly over the schedule (all steps), cycling prompts."""
    ordered = sorted(calls, key=lambda c: (c.step, c.prompt))
    return [ordered[i] for i in _spread(len(ordered), count)]


def schedule_picks(prompts: int, steps: int, count: int) -> set[tuple[int, int]]:
    """The ``(prompt, step)`` of the calls :func:`spread_over_schedule` keeps of ``prompts``
    trajectories of ``steps`` calls each (known before any is run)."""
    ordered = sorted(((p, s) for p in range(prompts) for s in range(steps)), key=lambda ps: (ps[1], ps[0]))
    return {ordered[i] for i in _spread(len(ordered), count)}


def _spread(n: int, count: int) -> list[int]:
    if count >= n:
        return list(range(n))
    return torch.linspace(0, n - 1, count).round().long().unique().tolist()


# ------------------------------------------------------------------------------------
# Activation statistics and range search
# ------------------------------------------------------------------------------------

class ActivationSampler:
    """Forward pre-hooks keeping a seeded random sample of each quantized layer's input.

    Values are kept per (layer, interval, part): ``part`` 1 holds the skip-connection half
    of a split input. The running absolute maximum is tracked exactly, the sample is
    uniform over elements (so L_p errors measured on it are unbiased estimates). With
    ``rows_per_sample`` it also keeps that many whole input rows per sample and layer (a
    linear layer's tokens, a convolution's receptive-field patches): what the layer's weight
    multiplies, for the output-error search.
    """

    def __init__(self, unet: nn.Module, values_per_sample: int, seed: int, rows_per_sample: int = 0):
        self.values_per_sample = values_per_sample
        self.rows_per_sample = rows_per_sample
        self.generator = torch.Generator().manual_seed(seed)
        self.row_generator = torch.Generator().manual_seed(seed + 1)  # own stream: the value sample stays as with "lp"
        self.samples: dict[tuple[str, int, int], list[torch.Tensor]] = defaultdict(list)
        self.amax: dict[tuple[str, int, int], float] = defaultdict(float)
        self.rows: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)
        self.handles = [layer.register_forward_pre_hook(self._hook(name, layer)) for name, layer in quant_layers(unet)]

    def _hook(self, name, layer):
        def hook(_module, args):
            x = args[0].detach()
            in_table = layer.in_scale_table()
            if in_table is not None:  # what the quantizer sees is x * s_in
                x = x * layer._per_sample(in_table[layer.router.scale_set], x)
            intervals = layer.router.interval.tolist()
            parts = _split_parts(x, layer)
            for b, interval in enumerate(intervals):
                for part, values in enumerate(parts):
                    self._keep((name, interval, part), values[b].reshape(-1))
                if self.rows_per_sample:
                    self._keep_rows((name, interval), layer, x[b : b + 1])
        return hook

    def _keep_rows(self, key, layer, x: torch.Tensor) -> None:
        if isinstance(layer, QuantConv2d):
            if layer.groups != 1:
                return  # grouped convolutions keep the L_p range
            rows = F.unfold(x.float(), layer.weight_shape[2:], layer.dilation, layer.padding, layer.stride)[0].T
        else:
            rows = x.float().reshape(-1, x.shape[-1])
        idx = torch.randperm(rows.shape[0], generator=self.row_generator)[: self.rows_per_sample]
        self.rows[key].append(rows[idx].cpu())

    def _keep(self, key, values: torch.Tensor) -> None:
        self.amax[key] = max(self.amax[key], float(values.abs().max()))
        n = min(self.values_per_sample, values.numel())
        idx = torch.randint(0, values.numel(), (n,), generator=self.generator)
        self.samples[key].append(values.float().cpu()[idx])

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _split_parts(x: torch.Tensor, layer) -> list[torch.Tensor]:
    if not layer.split:
        return [x]
    return list(x.split([layer.split, x.shape[layer.channel_dim] - layer.split], dim=layer.channel_dim))


def search_act_scale(values: torch.Tensor, amax: float, method: str = "lp", p: float = 2.4,
                     grid: int = 24, max_values: int = 1 << 16) -> float:
    """Per-tensor symmetric INT8 scale from sampled values.

    ``minmax`` uses ``amax / 127``. ``lp`` searches the clipping range ``alpha * amax``
    minimising the mean ``|x - Q(x)|^p``: a coarse grid over alpha in (0, 1], then a fine
    grid around the best coarse point (the error is unimodal in alpha in practice). At most
    ``max_values`` values (an even stride through the sample) enter the search.
    """
    amax = max(amax, 1e-8)
    if method == "minmax":
        return amax / ACT_QMAX
    v = values.float()
    if v.numel() > max_values:
        v = v[:: -(-v.numel() // max_values)]
    coarse = torch.linspace(1.0 / grid, 1.0, grid)
    best = coarse[_lp_errors(v, coarse * amax / ACT_QMAX, p).argmin()]
    step = 1.0 / grid
    fine = torch.linspace(max(best - step, step / grid), min(best + step, 1.0), grid)
    scales = torch.cat([fine, best.view(1)]) * amax / ACT_QMAX
    return float(scales[_lp_errors(v, scales, p).argmin()])


def _lp_errors(v: torch.Tensor, scales: torch.Tensor, p: float) -> torch.Tensor:
    """Mean ``|v - Q_s(v)|^p`` for each candidate scale s."""
    errors = []
    for s in scales.tolist():
        q = torch.clamp(torch.round(v / s), ACT_QMIN, ACT_QMAX) * s
        errors.append((v - q).abs_().pow_(p).mean())
    return torch.stack(errors)


@torch.no_grad()
def calibrate_activations(qunet: nn.Module, calls: list[UNetCall], config, device, progress=None) -> None:
    """Set every quantized layer's ``act_scale`` from the calibration calls (in place).

    Activation quantization is off while the statistics are gathered (the weights are
    already quantized). Per-interval scales fall back to the layer's global scale in an
    interval that no calibration call reached.
    """
    layers = dict(quant_layers(qunet))
    saved_bits = {name: layer.act_bits for name, layer in layers.items()}
    for layer in layers.values():
        layer.act_bits = None
    sampler = ActivationSampler(qunet, config.sample_values, config.seed,
                                OUTPUT_SEARCH_ROWS if config.act_search == "output" else 0)
    try:
        for call in calls:
            args, kwargs = call.to(device)
            qunet(*args, **kwargs)
            release_free_heap()  # the per-layer float weights of the call leave holes in the heap
            if progress is not None:
                progress()
    finally:
        sampler.close()
        for name, layer in layers.items():
            layer.act_bits = saved_bits[name]
    for name, layer in layers.items():
        layer.act_scale.copy_(_layer_scales(name, layer, sampler, config))


def _layer_scales(name, layer, sampler: ActivationSampler, config) -> torch.Tensor:
    method = "lp" if config.act_search == "output" else config.act_search
    sets, parts = layer.act_scale.shape
    table = torch.empty(sets, parts)
    for part in range(parts):
        keys = [k for k in sampler.samples if k[0] == name and k[2] == part]
        if not keys:
            table[:, part] = 1.0
            continue
        pooled = torch.cat([torch.cat(sampler.samples[k]) for k in keys])
        global_scale = search_act_scale(pooled, max(sampler.amax[k] for k in keys), method, config.lp_norm)
        for interval in range(sets):
            key = (name, interval, part)
            if sets == 1 or key not in sampler.samples:
                table[interval, part] = global_scale
            else:
                table[interval, part] = search_act_scale(
                    torch.cat(sampler.samples[key]), sampler.amax[key], method, config.lp_norm
                )
    if config.act_search == "output":
        table = _refine_on_output(name, layer, sampler, table)
    return table


OUTPUT_SEARCH_ROWS = 8  # whole input rows kept per sample and layer for act_search="output"
OUTPUT_SEARCH_FACTORS = (1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.1, 1.2, 1.35, 1.5)  # x the L_p scale (1.0 first: kept on ties)
OUTPUT_SEARCH_MAX_ROWS = 2048  # rows per search (an even stride through the kept ones)


def _refine_on_output(name, layer, sampler: ActivationSampler, table: torch.Tensor) -> torch.Tensor:
    """Each activation scale of ``table`` (from the L_p search) multiplied by the factor of
    ``OUTPUT_SEARCH_FACTORS`` that minimises the layer's output error ``|R W^T - Q(R) W^T|^2``
    on the kept input rows R of its interval (all intervals for a global row), with the
    layer's quantized weight W. A split input's parts are refined in turn, the other part
    quantized at its current scale."""
    keys = sorted(k for k in sampler.rows if k[0] == name)
    if not keys:
        return table
    weight = layer.dequantized_weight(layer.w_int, layer.s_ptq, torch.float32).reshape(layer.out_features, -1).cpu()
    per_channel = weight.shape[1] // layer.in_features  # conv patches: C_in x kernel, channel-major
    bounds = [(0, weight.shape[1])] if not layer.split else [
        (0, layer.split * per_channel), (layer.split * per_channel, weight.shape[1])]
    table = table.clone()
    sets = table.shape[0]
    for interval in range(sets):
        chosen = [(name, interval)] if sets > 1 and (name, interval) in sampler.rows else keys
        rows = torch.cat([torch.cat(sampler.rows[k]) for k in chosen])
        rows = rows[:: -(-rows.shape[0] // OUTPUT_SEARCH_MAX_ROWS)]
        reference = rows @ weight.T
        scales = table[interval].tolist()
        for part, (lo, hi) in enumerate(bounds):
            best, best_err = scales[part], None
            for factor in OUTPUT_SEARCH_FACTORS:
                trial = scales[:part] + [scales[part] * factor] + scales[part + 1 :]
                quantized = torch.cat([_quantize_act(rows[:, a:b], s) for (a, b), s in zip(bounds, trial)], dim=1)
                err = float(((quantized @ weight.T - reference) ** 2).sum())
                if best_err is None or err < best_err:
                    best, best_err = trial[part], err
            scales[part] = best
        table[interval] = torch.tensor(scales)
    return table


def _quantize_act(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale), ACT_QMIN, ACT_QMAX) * scale


# ------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------

def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum ref^2 / sum (ref - test)^2)`` in dB."""
    reference, test = reference.detach().double(), test.detach().double()
    noise = (reference - test).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(reference.pow(2).sum() / noise))


@torch.no_grad()
def unet_outputs(unet: nn.Module, calls: list[UNetCall], device) -> list[torch.Tensor]:
    """The UNet's noise predictions for each call, on the CPU, in float32."""
    outputs = []
    for call in calls:
        args, kwargs = call.to(device)
        outputs.append(unet(*args, **kwargs, return_dict=False)[0].float().cpu())
        release_free_heap()
    return outputs


def sqnr_by_interval(reference: list[torch.Tensor], test: list[torch.Tensor], calls: list[UNetCall],
                     intervals) -> tuple[float, list[float | None]]:
    """Overall SQNR and SQNR per timestep interval (None for an interval with no call)."""
    overall = sqnr_db(torch.cat([r.flatten() for r in reference]), torch.cat([t.flatten() for t in test]))
    per = []
    for k in range(intervals.k):
        idx = [i for i, c in enumerate(calls) if intervals.index(c.timestep) == k]
        if not idx:
            per.append(None)
            continue
        per.append(sqnr_db(torch.cat([reference[i].flatten() for i in idx]), torch.cat([test[i].flatten() for i in idx])))
    return overall, per

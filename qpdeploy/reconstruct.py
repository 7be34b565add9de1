"""Block reconstruction with learned rounding (BRECQ with AdaRound, as Q-Diffusion calibrates).

Once the clipping search has fixed each layer's per-channel weight scale ``s``, rounding every
weight to the nearest integer is not the best choice: the errors of a layer's weights add up
in its output, and a weight rounded the other way can cancel its neighbours' errors. AdaRound
learns, for every weight, whether it rounds down or up; BRECQ does it for a whole block at a
time (a resnet, a transformer, a down- or upsampler), so the rounding of one layer can make up
for the next one's.

For each block, in the order the UNet runs them:

1. the block's inputs are recorded from the quantized UNet (earlier blocks already rounded,
   activation quantization off, as in the calibration that follows) and its targets from the
   float UNet (the float block on the float inputs), one pair per calibration call;
2. every weight gets a rounding variable ``V``; the block runs with the soft weight
   ``s * clamp(floor(W / s) + h(V), qmin, qmax)``, ``h`` AdaRound's rectified sigmoid, starting
   from the float weight itself (``h(V) = frac(W / s)``);
3. Adam minimises the block's relative output error plus a regulariser that pushes every
   ``h(V)`` to 0 or 1 (off for the first fifth of the steps, then with its exponent annealed
   from 20 to 2, as AdaRound does);
4. the integer weight becomes ``floor(W / s) + [h(V) >= 1/2]``, clamped to the range.

Seeded and deterministic on a CPU; it only ever changes integer weights (scales, activation
ranges and the artifact format are those of plain rounding), so a base made with it is an
ordinary base.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .calibrate import UNetCall, tree_to
from .layers import QuantLayer, quant_layers, weight_qrange

BLOCK_TYPES = ("ResnetBlock2D", "Transformer2DModel", "Downsample2D", "Upsample2D")
ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h reaches 0 and 1 exactly
WARMUP = 0.2  # share of the steps with the rounding regulariser off
BETA = (20.0, 2.0)  # the regulariser's exponent, annealed from the first to the second


class _Stop(Exception):
    """Raised by a capture hook: the rest of the UNet call is not needed."""


def reconstruction_blocks(qunet: nn.Module, call: UNetCall, device="cpu") -> list[str]:
    """Names of the blocks to reconstruct, in the order one UNet call runs them: every module
    of ``BLOCK_TYPES`` holding a quantized layer, and each quantized layer outside those."""
    groups = [name for name, module in qunet.named_modules()
              if type(module).__name__ in BLOCK_TYPES and any(isinstance(m, QuantLayer) for m in module.modules())]
    groups += [name for name, _ in quant_layers(qunet) if not any(name.startswith(g + ".") for g in groups)]
    order: list[str] = []
    handles = [qunet.get_submodule(name).register_forward_pre_hook(
        lambda *_, name=name: None if name in order else order.append(name)) for name in groups]
    try:
        args, kwargs = call.to(device)
        with torch.no_grad():
            qunet(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return order


def _main_tensor(output) -> torch.Tensor:
    """The block's output tensor (diffusers blocks return a tensor, a tuple or an output object)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample


@torch.no_grad()
def _capture(unet: nn.Module, name: str, calls: list[UNetCall], device, what: str) -> list:
    """Per call, the block's ``(args, kwargs)`` (``what="inputs"``) or its output tensor."""
    got = []

    def before(_module, args, kwargs):
        got.append((tree_to(args, device), tree_to(kwargs, device)))
        raise _Stop

    def after(_module, _args, _kwargs, output):
        got.append(_main_tensor(output).detach())
        raise _Stop

    block = unet.get_submodule(name)
    handle = (block.register_forward_pre_hook(before, with_kwargs=True) if what == "inputs"
              else block.register_forward_hook(after, with_kwargs=True))
    try:
        for call in calls:
            args, kwargs = call.to(device)
            try:
                unet(*args, **kwargs)
            except _Stop:
                continue
            raise RuntimeError(f"block {name} did not run in a UNet call")
    finally:
        handle.remove()
    return got


class _SoftRounding:
    """A quantized layer running on its learned soft weight while the block trains."""

    def __init__(self, layer: QuantLayer, weight: torch.Tensor):
        if layer.num_sets or layer.s_in is not None:
            raise ValueError("block reconstruction runs on a post-training base (no scale sets)")
        self.layer = layer
        self.lo, self.hi = weight_qrange(layer.weight_bits)
        scale = layer.s_ptq.view(-1, *([1] * (weight.ndim - 1)))
        scaled = weight.detach().float().to(scale.device) / scale
        self.scale, self.floor = scale, torch.floor(scaled)
        self.nearest = torch.clamp(torch.round(scaled), self.lo, self.hi)
        rest = (scaled - self.floor).clamp(1e-4, 1 - 1e-4)  # h(V) = rest at the start
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        layer.forward = self.forward  # an instance attribute: the class's forward is untouched

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.clamp(self.floor + self.h(), self.lo, self.hi) * self.scale
        z = self.layer.apply_weight(x, weight.to(x.dtype))
        if self.layer.bias is not None:
            z = z + self.layer.bias.to(z.dtype).view(self.layer._bias_view(z))
        return z

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).mean()

    def finish(self) -> dict:
        """Install the learned integer weight and restore the layer's forward. Returns the
        share of weights rounded away from the nearest integer, and the share whose ``h``
        was still undecided (strictly between 0.01 and 0.99) when training stopped."""
        del self.layer.forward
        with torch.no_grad():
            h = self.h()
            w_int = torch.clamp(self.floor + (self.v >= 0), self.lo, self.hi)  # v >= 0 <=> h(V) >= 1/2
            self.layer.set_int_weight(w_int.to(torch.int8))
            return {"moved": float((w_int != self.nearest).float().mean()),
                    "undecided": float(((h > 0.01) & (h < 0.99)).float().mean())}


def reconstruct_blocks(qunet: nn.Module, fp_unet: nn.Module, float_weights: dict[str, torch.Tensor],
                       calls: list[UNetCall], steps: int, lr: float = 0.1, weight: float = 0.1, seed: int = 0,
                       device="cpu", progress=None) -> dict:
    """Learn the rounding of every quantized layer's weight, block by block (in place).

    Args:
        qunet: the quantized UNet after the weight search (its ``s_ptq`` are kept).
        fp_unet: the float UNet it was made from (unchanged).
        float_weights: the float weight of each quantized layer, by module name.
        calls: calibration calls; each reconstruction step uses one of them.
        steps: Adam steps per block.
        lr, weight: Adam's learning rate on the rounding variables, the regulariser's weight.
        progress: optional callable invoked once per block.

    Returns:
        A JSON-able summary: ``blocks``; ``relative_error``, the blocks' mean relative output
        error on the calibration calls (squared error over squared target) with
        round-to-nearest (``nearest``) and with the learned rounding (``learned``); ``moved``,
        the share of weights rounded away from the nearest integer; ``undecided``, the share
        whose ``h(V)`` had not reached 0 or 1.
    """
    from .qunet import get_router

    router = get_router(qunet)
    layers = dict(quant_layers(qunet))
    saved_bits = {name: layer.act_bits for name, layer in layers.items()}
    for layer in layers.values():
        layer.act_bits = None
    generator = torch.Generator().manual_seed(seed)
    errors = {"nearest": [], "learned": []}
    weights = moved = undecided = 0.0
    try:
        for name in reconstruction_blocks(qunet, calls[0], device):
            block = qunet.get_submodule(name)
            data = _BlockData(calls, _capture(qunet, name, calls, device, "inputs"),
                              _capture(fp_unet, name, calls, device, "outputs"), router, device)
            members = [(name, block)] if isinstance(block, QuantLayer) else \
                [(f"{name}.{sub}", layer) for sub, layer in quant_layers(block)]
            errors["nearest"].append(data.error(block))
            soft = [_SoftRounding(layer, float_weights[full]) for full, layer in members]
            _train(block, soft, data, steps, lr, weight, generator)
            for rounding in soft:
                stats, count = rounding.finish(), rounding.floor.numel()
                weights, moved, undecided = weights + count, moved + stats["moved"] * count, \
                    undecided + stats["undecided"] * count
            errors["learned"].append(data.error(block))
            if progress is not None:
                progress()
    finally:
        for name, layer in layers.items():
            layer.act_bits = saved_bits[name]
            layer.__dict__.pop("forward", None)
    blocks = len(errors["learned"])
    return {"blocks": blocks, "steps": steps,
            "relative_error": {k: sum(v) / max(blocks, 1) for k, v in errors.items()},
            "moved": moved / max(weights, 1), "undecided": undecided / max(weights, 1)}


class _BlockData:
    """One block's recorded inputs and float targets, and how to run the block on call ``i``
    (its quantized layers read the call's routing)."""

    def __init__(self, calls, inputs, targets, router, device):
        self.calls, self.inputs, self.targets, self.router, self.device = calls, inputs, targets, router, device

    def __len__(self) -> int:
        return len(self.inputs)

    def run(self, block, i: int) -> torch.Tensor:
        sample, timestep = self.calls[i].args[:2]
        self.router.route(timestep.to(self.device), sample.shape[0], self.device)
        args, kwargs = self.inputs[i]
        return _main_tensor(block(*args, **kwargs))

    def relative(self, out: torch.Tensor, i: int) -> torch.Tensor:
        target = self.targets[i]
        return (out - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)

    @torch.no_grad()
    def error(self, block) -> float:
        """Relative output error over all calls: sum of squared errors over sum of squared targets."""
        num = den = 0.0
        for i in range(len(self)):
            out = self.run(block, i)
            num += float((out - self.targets[i]).pow(2).sum())
            den += float(self.targets[i].pow(2).sum())
        return num / max(den, 1e-12)


def _train(block, soft: list[_SoftRounding], data: _BlockData, steps: int, lr: float, weight: float,
           generator) -> None:
    optimizer = torch.optim.Adam([s.v for s in soft], lr=lr)
    warmup = int(WARMUP * steps)
    for step in range(steps):
        i = int(torch.randint(len(data), (1,), generator=generator))
        loss = data.relative(data.run(block, i), i)
        if step >= warmup:
            progress = (step - warmup) / max(steps - warmup, 1)
            beta = BETA[1] + 0.5 * (BETA[0] - BETA[1]) * (1 + math.cos(math.pi * progress))
            loss = loss + weight * sum(s.regulariser(beta) for s in soft)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

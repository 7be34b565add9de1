"""AdamW over scale sets that never moves a set the step did not train.

AdamW on a layer's whole (E, C) scale table moves every row at every step: momentum keeps
pushing a row after its gradient became zero, and weight decay shrinks rows that got no
gradient at all. With S2, where a batch may not hold every interval, that silently trains
scale sets on other intervals' data.

Here each scale set is its own optimizer parameter: set e is one flat float32 vector
``delta[e]`` holding, for every quantized layer in module order, its ``s_out`` row and (with
input scales) its ``s_in`` row in relative units,

    s_out[e] = s_ptq * (1 + delta_out)        s_in[e] = 1 + delta_in

so the learning rate is a fraction of the post-training scale whatever the layer, and
weight decay pulls towards the post-training scales. ``torch.optim.AdamW`` skips a
parameter whose ``.grad`` is None entirely (no moment update, no step count, no decay), so
a set the batch was not routed to is handed no gradient and stays bit for bit where it was.
"""

from __future__ import annotations

import torch

from .layers import quant_layers


class ScaleSetOptimizer:
    """``torch.optim.AdamW`` with one parameter per scale set of a quantized UNet.

    Args:
        unet: a quantized UNet whose layers hold E >= 1 trainable scale sets; their
            ``s_out`` (and ``s_in``) are switched to ``requires_grad`` here.
        lr, weight_decay, betas, eps: AdamW hyperparameters (lr in relative units).
    """

    def __init__(self, unet, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
        self.layers = [layer for _, layer in quant_layers(unet)]
        sets = {layer.num_sets for layer in self.layers}
        if len(sets) != 1 or 0 in sets:
            raise ValueError(f"every quantized layer needs the same number (>= 1) of scale sets, got {sorted(sets)}")
        self.num_sets = sets.pop()
        for layer in self.layers:
            layer.s_out.requires_grad_(True)
            if layer.s_in is not None:
                layer.s_in.requires_grad_(True)
        with torch.no_grad():
            self.delta = [self._read(e) for e in range(self.num_sets)]
        self.optimizer = torch.optim.AdamW(self.delta, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    @property
    def size(self) -> int:
        """Trainable values per set."""
        return self.delta[0].numel()

    def _read(self, e: int) -> torch.Tensor:
        """delta of set e from the layers' current scales (0 for sets at their start)."""
        parts = []
        for layer in self.layers:
            parts.append(layer.s_out[e].detach() / layer.s_ptq - 1)
            if layer.s_in is not None:
                parts.append(layer.s_in[e].detach() - 1)
        return torch.cat(parts).float()

    def _gradient(self, e: int) -> torch.Tensor:
        """d loss / d delta[e] from the layers' scale gradients (chain rule of the relative form)."""
        parts = []
        for layer in self.layers:
            g = layer.s_out.grad
            parts.append(torch.zeros_like(layer.s_ptq) if g is None else g[e] * layer.s_ptq)
            if layer.s_in is not None:
                g = layer.s_in.grad
                parts.append(torch.zeros_like(layer.s_in[e]) if g is None else g[e])
        return torch.cat(parts)

    @torch.no_grad()
    def write(self, e: int) -> None:
        """Install ``delta[e]`` into the layers' scale tables (row e)."""
        d, offset = self.delta[e], 0
        for layer in self.layers:
            n = layer.out_features
            layer.s_out[e] = layer.s_ptq * (1 + d[offset:offset + n])
            offset += n
            if layer.s_in is not None:
                n = layer.in_features
                layer.s_in[e] = 1 + d[offset:offset + n]
                offset += n

    def step(self, trained: list[bool], scaler=None) -> None:
        """One AdamW step on the sets with ``trained[e]``; the others are not touched.

        ``trained[e]`` says whether any sample since the last step was routed to set e.
        The layers' scale gradients are consumed and cleared.
        """
        for e, delta in enumerate(self.delta):
            delta.grad = self._gradient(e) if trained[e] else None
        if scaler is None:
            self.optimizer.step()
        else:
            scaler.step(self.optimizer)
        for e in range(self.num_sets):
            if trained[e]:
                self.write(e)
        self.zero_grad()

    def zero_grad(self) -> None:
        """Clear the layers' scale gradients and the sets' gradients."""
        for layer in self.layers:
            layer.s_out.grad = None
            if layer.s_in is not None:
                layer.s_in.grad = None
        for delta in self.delta:
            delta.grad = None

    def release(self) -> None:
        """Stop training: the scale tables no longer require gradients."""
        self.zero_grad()
        for layer in self.layers:
            layer.s_out.requires_grad_(False)
            if layer.s_in is not None:
                layer.s_in.requires_grad_(False)

    # -- checkpoints: plain tensors and JSON, no pickle -------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The sets and AdamW's per-set state as named tensors (for safetensors)."""
        names = [str(e) for e in range(self.num_sets)]
        return {**{f"delta.{n}": d.detach() for n, d in zip(names, self.delta)},
                **adamw_state_tensors(self.optimizer, names)}

    def hyperparameters(self) -> dict:
        """AdamW's param-group settings (JSON-able)."""
        return adamw_hyperparameters(self.optimizer)

    def load_state(self, tensors: dict[str, torch.Tensor], hyperparameters: dict) -> None:
        """Restore :meth:`state_tensors` / :meth:`hyperparameters` and install every set."""
        with torch.no_grad():
            for e, delta in enumerate(self.delta):
                delta.copy_(tensors[f"delta.{e}"])
                self.write(e)
        load_adamw_state(self.optimizer, tensors, hyperparameters, [str(e) for e in range(self.num_sets)])


def adamw_state_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    """A one-group optimizer's per-parameter state as tensors ``adam.<name>.<key>`` (parameter i
    is ``names[i]``), for safetensors checkpoints."""
    state = optimizer.state_dict()["state"]
    return {f"adam.{name}.{key}": torch.as_tensor(value)
            for i, name in enumerate(names) for key, value in state.get(i, {}).items()}


def adamw_hyperparameters(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's (single) param-group settings, JSON-able."""
    group = optimizer.state_dict()["param_groups"][0]
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}


def load_adamw_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], hyperparameters: dict,
                     names: list[str]) -> None:
    """Restore :func:`adamw_state_tensors` / :func:`adamw_hyperparameters` (a parameter
    without state, one never stepped, stays without)."""
    state = {}
    for i, name in enumerate(names):
        prefix = f"adam.{name}."
        entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if entry:
            state[i] = entry
    group = {k: (tuple(v) if isinstance(v, list) else v) for k, v in hyperparameters.items()}
    group["params"] = list(range(len(names)))
    optimizer.load_state_dict({"state": state, "param_groups": [group]})

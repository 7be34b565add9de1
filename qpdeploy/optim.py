"""AdamW over scale sets that never moves a set the step did not train.

AdamW on a layer's whole (E, C) scale table moves every row at every step: momentum keeps
pushing a row after its gradient became zero, and weight decay shrinks rows that got no
gradient at all. With S2, where a batch may not hold every interval, that silently trains
scale sets on other intervals' data.

So while training, each layer's tables are parametrized (``torch.nn.utils.parametrize``):
the real parameters are one vector per layer, table and scale set, in relative units,

    s_out[e] = s_ptq * (1 + r * delta_out[e])        s_in[e] = 1 + r * delta_in[e]

and ``layer.s_out`` / ``layer.s_in`` are computed from them at every access, so autograd
delivers the gradients where the optimizer steps (clipping, gradient scaling or another
optimizer on ``unet.parameters()`` see the tensors that actually train). The learning rate
is a fraction of the post-training scale whatever the layer, and weight decay pulls towards
the post-training scales. ``r`` is the layer's rate (1 unless the caller gives another):
AdamW's step is invariant to the gradient's scale, so ``delta`` moves as much as in any
layer and the scales move ``r`` times as far, a learning rate of ``r * lr`` for that layer
within one parameter group (checkpoints keep one flat state per set).

``torch.optim.AdamW`` skips a parameter whose ``.grad`` is None entirely (no moment update,
no step count, no decay); a set the batch was not routed to is handed no gradient and stays
bit for bit where it was. Releasing the optimizer bakes the tables back into plain, frozen
tensors.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .layers import quant_layers

TABLES = ("s_out", "s_in")


class RelativeScales(nn.Module):
    """Parametrization of an (E, C) scale table as E vectors relative to a reference row:
    ``table[e] = reference * (1 + rate * delta[e])``; the reference is ``s_ptq`` for ``s_out``
    and ones for ``s_in``. A set equal to its reference has ``delta`` exactly 0."""

    def __init__(self, layer, table: str, rate: float = 1.0):
        super().__init__()
        object.__setattr__(self, "layer", layer)  # read, not owned (not a submodule)
        self.table, self.rate = table, rate

    def reference(self) -> torch.Tensor:
        return self.layer.s_ptq if self.table == "s_out" else None

    def forward(self, *deltas: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(deltas)
        table = 1 + (stacked if self.rate == 1 else self.rate * stacked)
        reference = self.reference()
        return table if reference is None else reference * table

    def right_inverse(self, table: torch.Tensor) -> tuple[torch.Tensor, ...]:
        reference = self.reference()
        relative = table if reference is None else table / reference
        return tuple((row - 1) / self.rate for row in relative.detach().float())


class ScaleSetOptimizer:
    """``torch.optim.AdamW`` over the scale sets of a quantized UNet, one set at a time.

    Args:
        unet: a quantized UNet whose layers hold E >= 1 trainable scale sets; their
            ``s_out`` (and ``s_in``) are parametrized here until :meth:`release`.
        lr, weight_decay, betas, eps: AdamW hyperparameters (lr in relative units).
        keep: names of layers whose tables stay as they are (not parametrized, not trained).
        rates: layer name -> rate (> 0): that layer's scales move at ``rate * lr`` (see the
            module doc); layers not named move at ``lr``.
    """

    def __init__(self, unet, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8,
                 keep: frozenset[str] = frozenset(), rates: dict[str, float] | None = None):
        rates = rates or {}
        named = [(name, layer) for name, layer in quant_layers(unet) if name not in keep]
        self.layers = [layer for _, layer in named]
        if not self.layers:
            raise ValueError("every quantized layer is kept: no scale to train")
        sets = {layer.num_sets for layer in self.layers}
        if len(sets) != 1 or 0 in sets:
            raise ValueError(f"every quantized layer needs the same number (>= 1) of scale sets, got {sorted(sets)}")
        self.num_sets = sets.pop()
        self.sets: list[list[nn.Parameter]] = [[] for _ in range(self.num_sets)]
        for name, layer in named:
            for table in TABLES:
                if getattr(layer, table) is None:
                    continue
                if not parametrize.is_parametrized(layer, table):
                    parametrize.register_parametrization(layer, table, RelativeScales(layer, table, rates.get(name, 1.0)))
                originals = layer.parametrizations[table]
                for e in range(self.num_sets):
                    self.sets[e].append(getattr(originals, f"original{e}").requires_grad_(True))
        self.optimizer = torch.optim.AdamW([p for params in self.sets for p in params], lr=lr, betas=betas, eps=eps,
                                           weight_decay=weight_decay, foreach=True)

    @property
    def size(self) -> int:
        """Trainable values per set."""
        return sum(p.numel() for p in self.sets[0])

    def parameters(self, e: int) -> list[nn.Parameter]:
        """The parameters of scale set ``e`` (every layer's ``delta_out[e]``, then ``delta_in[e]``)."""
        return self.sets[e]

    def step(self, trained: list[bool], scaler=None) -> None:
        """One AdamW step on the sets with ``trained[e]``; the others are not touched.

        ``trained[e]`` says whether any sample since the last step was routed to set e.
        Gradients are consumed and cleared.
        """
        for e, params in enumerate(self.sets):
            for p in params:
                if not trained[e]:
                    p.grad = None
                elif p.grad is None:  # a layer this step never ran: a zero gradient, as its set moves
                    p.grad = torch.zeros_like(p)
        if scaler is None:
            self.optimizer.step()
        else:
            scaler.step(self.optimizer)
        self.zero_grad()

    def sum_gradients(self, trained: list[bool], sum_) -> None:
        """Data parallel: sum the trained sets' gradients over processes (``sum_`` reduces a
        flat tensor in place), in one buffer. Every process marks the same ``trained``."""
        grads = []
        for e, params in enumerate(self.sets):
            if trained[e]:
                for p in params:
                    if p.grad is None:  # this process's micro-batches did not reach the layer
                        p.grad = torch.zeros_like(p)
                    grads.append(p.grad)
        if not grads:
            return
        flat = sum_(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def zero_grad(self) -> None:
        """Clear the sets' gradients."""
        self.optimizer.zero_grad(set_to_none=True)

    def release(self) -> None:
        """Stop training: the tables become plain frozen tensors holding the trained values."""
        self.zero_grad()
        for layer in self.layers:
            if not parametrize.is_parametrized(layer):
                continue
            with torch.no_grad():
                trained = [None if getattr(layer, t) is None else getattr(layer, t).clone() for t in TABLES]
            for table in TABLES:
                if parametrize.is_parametrized(layer, table):
                    parametrize.remove_parametrizations(layer, table, leave_parametrized=True)
            layer.set_scale_sets(*trained)

    # -- checkpoints: plain tensors and JSON, no pickle -------------------------------
    # A set is stored as one flat vector in the parameters' order (every layer's s_out part,
    # then its s_in part), and so is each of its AdamW moments; all parameters of a set step
    # together, so they share one step count.
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The sets and AdamW's per-set state as named tensors (for safetensors)."""
        tensors = {}
        state = self.optimizer.state
        for e, params in enumerate(self.sets):
            tensors[f"delta.{e}"] = torch.cat([p.detach().flatten() for p in params])
            if params[0] in state:
                for key in ("exp_avg", "exp_avg_sq"):
                    tensors[f"adam.{e}.{key}"] = torch.cat([state[p][key].flatten() for p in params])
                tensors[f"adam.{e}.step"] = torch.as_tensor(state[params[0]]["step"]).clone()
        return tensors

    def hyperparameters(self) -> dict:
        """AdamW's param-group settings (JSON-able)."""
        return adamw_hyperparameters(self.optimizer)

    def load_state(self, tensors: dict[str, torch.Tensor], hyperparameters: dict) -> None:
        """Restore :meth:`state_tensors` / :meth:`hyperparameters` into the sets."""
        state, index = {}, 0
        for e, params in enumerate(self.sets):
            pieces = {key: self._split(tensors[f"adam.{e}.{key}"], params) for key in ("exp_avg", "exp_avg_sq")
                      if f"adam.{e}.{key}" in tensors}
            with torch.no_grad():
                for p, value in zip(params, self._split(tensors[f"delta.{e}"], params)):
                    p.copy_(value)
            for j, _ in enumerate(params):
                if pieces:
                    state[index] = {"step": tensors[f"adam.{e}.step"].clone(),
                                    **{key: values[j] for key, values in pieces.items()}}
                index += 1
        group = {k: (tuple(v) if isinstance(v, list) else v) for k, v in hyperparameters.items()}
        group["params"] = list(range(index))
        self.optimizer.load_state_dict({"state": state, "param_groups": [group]})

    @staticmethod
    def _split(flat: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
        sizes = [p.numel() for p in params]
        if flat.numel() != sum(sizes):
            raise ValueError(f"a checkpointed scale set holds {flat.numel()} values; this model's sets hold {sum(sizes)}")
        return [piece.view_as(p).to(p.device, p.dtype) for piece, p in zip(flat.split(sizes), params)]


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

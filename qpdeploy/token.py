"""Pivotal tuning: the identifier's token embedding trains with the scales (``--train-token``).

A rare identifier ("sks") is a word the text encoder knows only weakly. Scale training alone
must teach the UNet to answer that weak signal; pivotal tuning (as in textual inversion, and
in the DreamBooth-LoRA recipes that call it so) also trains the identifier's row of each text
encoder's input-embedding table, so the word itself comes to carry the subject.

- :func:`identifier_token_ids`: the identifier's token id in every tokenizer of a pipeline;
  an identifier that splits into several tokens is refused (one row cannot carry it).
- :class:`TokenTuner`: during training, a forward hook on each text encoder's embedding
  layer puts a trainable row where the identifier's id occurs; the rows train with their own
  AdamW (lr ``TrainConfig.token_lr``). The encoders' weights are never written.
- :func:`apply_tokens` writes a pack's rows into a pipeline's text encoders (after checking
  that its tokenizers still map the identifier to the recorded ids), which is how
  ``qpdeploy export`` bakes them into the text-encoder ONNX; :func:`tokens_applied` does the
  same for the length of a ``with`` block.

The rows travel in the pack's safetensors file (``token.<encoder>``, covered by the pack hash)
and the ids in ``pack.json`` (``token``).
"""

from __future__ import annotations

import contextlib

import torch

from .errors import QPDeployError
from .optim import adamw_hyperparameters, adamw_state_tensors, load_adamw_state

ENCODERS = ("text_encoder", "text_encoder_2")
PREFIX = "token."  # safetensors key prefix of a row in the pack


def text_encoders(pipe) -> dict[str, tuple[object, object]]:
    """``{name: (tokenizer, encoder)}`` for every text encoder the pipeline has."""
    found = {}
    for name in ENCODERS:
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            found[name] = (getattr(pipe, name.replace("text_encoder", "tokenizer")), encoder)
    if not found:
        raise QPDeployError("the pipeline has no text encoder to tune the identifier in")
    return found


def identifier_token_ids(pipe, identifier: str) -> dict[str, int]:
    """The identifier's single token id in each tokenizer of ``pipe``.

    Raises:
        QPDeployError: the identifier is several tokens (or none) in some tokenizer.
    """
    ids = {}
    for name, (tokenizer, _) in text_encoders(pipe).items():
        pieces = tokenizer(identifier, add_special_tokens=False).input_ids
        if len(pieces) != 1:
            shown = ", ".join(tokenizer.convert_ids_to_tokens(pieces)) or "nothing"
            raise QPDeployError(f"--train-token needs an identifier that is one token: {identifier!r} is "
                                f"{len(pieces)} tokens ({shown}) for {name}'s tokenizer; pick a rare word "
                                "the tokenizer keeps whole (such as sks)")
        if pieces[0] == getattr(tokenizer, "unk_token_id", None):
            raise QPDeployError(f"--train-token: {identifier!r} is not in {name}'s vocabulary (it reads as "
                                f"{tokenizer.unk_token!r}); pick a word the tokenizer knows")
        ids[name] = int(pieces[0])
    return ids


class TokenTuner:
    """Trainable identifier rows hooked into a pipeline's text encoders (see module doc).

    Args:
        pipe: the pipeline whose text encoders encode the training prompts (frozen).
        identifier: the word to tune (one token in every tokenizer).
        lr, weight_decay: AdamW over the rows.
    """

    def __init__(self, pipe, identifier: str, lr: float, weight_decay: float = 0.0):
        self.identifier, self.ids = identifier, identifier_token_ids(pipe, identifier)
        self.encoders = {name: encoder for name, (_, encoder) in text_encoders(pipe).items()}
        self.rows = {}
        self._trainable = {name: [p.requires_grad for p in e.parameters()] for name, e in self.encoders.items()}
        for name, encoder in self.encoders.items():
            encoder.requires_grad_(False)
            table = encoder.get_input_embeddings().weight
            self.rows[name] = torch.nn.Parameter(table[self.ids[name]].detach().float().clone())
        self.optimizer = torch.optim.AdamW(list(self.rows.values()), lr=lr, weight_decay=weight_decay)
        self._hooks = [self.encoders[name].get_input_embeddings().register_forward_hook(self._hook(name))
                       for name in self.encoders]

    def _hook(self, name):
        def put_row(module, args, output):
            mask = (args[0] == self.ids[name]).unsqueeze(-1)
            return torch.where(mask, self.rows[name].to(output.dtype), output)

        return put_row

    @property
    def size(self) -> int:
        """Trainable values (one row per text encoder)."""
        return sum(r.numel() for r in self.rows.values())

    def step(self, scaler=None) -> None:
        """One AdamW step on the rows (their gradients are consumed)."""
        if scaler is None:
            self.optimizer.step()
        else:
            scaler.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The rows as a pack stores them: ``{"token.<encoder>": (D,) float32}``."""
        return {PREFIX + name: row.detach().float().cpu().clone() for name, row in self.rows.items()}

    def release(self) -> None:
        """Remove the hooks and restore the encoders' requires_grad flags: they compute as
        before training."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for name, encoder in self.encoders.items():
            for parameter, flag in zip(encoder.parameters(), self._trainable[name]):
                parameter.requires_grad_(flag)

    # -- checkpoints: plain tensors and JSON ---------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Rows and AdamW state as named tensors (for safetensors)."""
        return {**{f"row.{name}": row.detach() for name, row in self.rows.items()},
                **adamw_state_tensors(self.optimizer, list(self.rows))}

    def hyperparameters(self) -> dict:
        return adamw_hyperparameters(self.optimizer)

    def load_state(self, tensors: dict[str, torch.Tensor], hyperparameters: dict) -> None:
        """Restore :meth:`state_tensors` / :meth:`hyperparameters`."""
        with torch.no_grad():
            for name, row in self.rows.items():
                if f"row.{name}" not in tensors:
                    raise QPDeployError(f"the checkpoint holds no identifier row for {name}")
                row.copy_(tensors[f"row.{name}"])
        load_adamw_state(self.optimizer, tensors, hyperparameters, list(self.rows))


def check_token_record(pipe, record: dict, tensors: dict[str, torch.Tensor], where: str = "the scale pack") -> None:
    """Refuse a pack's token rows that do not fit ``pipe`` (other tokenizer, other width).

    Raises:
        QPDeployError: one line naming the mismatch.
    """
    encoders = text_encoders(pipe)
    ids = record.get("ids", {})
    if set(ids) != set(encoders) or set(tensors) != {PREFIX + name for name in encoders}:
        raise QPDeployError(f"{where} tunes the identifier in {', '.join(sorted(ids)) or 'no encoder'}, "
                            f"the model has {', '.join(encoders)}")
    now = identifier_token_ids(pipe, record["identifier"])
    for name, (_, encoder) in encoders.items():
        if now[name] != ids[name]:
            raise QPDeployError(f"{where} was trained with {record['identifier']!r} as token {ids[name]} of "
                                f"{name}, this model's tokenizer maps it to {now[name]} (another tokenizer)")
        width = encoder.get_input_embeddings().weight.shape[1]
        row = tensors[PREFIX + name]
        if tuple(row.shape) != (width,):
            raise QPDeployError(f"{where}: the identifier row for {name} has shape {tuple(row.shape)}, "
                                f"the encoder's embeddings are {width} wide")


def apply_tokens(pipe, record: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write a pack's identifier rows into ``pipe``'s text encoders, in place (checked first)."""
    check_token_record(pipe, record, tensors)
    with torch.no_grad():
        for name, (_, encoder) in text_encoders(pipe).items():
            table = encoder.get_input_embeddings().weight
            table[record["ids"][name]] = tensors[PREFIX + name].to(table.dtype)


@contextlib.contextmanager
def tokens_applied(pipe, record: dict | None, tensors: dict[str, torch.Tensor]):
    """:func:`apply_tokens` for the length of a ``with`` block (nothing when ``record`` is None)."""
    if not record:
        yield pipe
        return
    saved = {name: encoder.get_input_embeddings().weight[record["ids"][name]].detach().clone()
             for name, (_, encoder) in text_encoders(pipe).items() if name in record.get("ids", {})}
    apply_tokens(pipe, record, tensors)
    try:
        yield pipe
    finally:
        with torch.no_grad():
            for name, row in saved.items():
                text_encoders(pipe)[name][1].get_input_embeddings().weight[record["ids"][name]] = row

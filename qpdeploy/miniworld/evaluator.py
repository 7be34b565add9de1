"""The miniworld evaluator: a small CNN that reads background, shape, colour and subject.

It plays the part CLIP and DINO play for real diffusion models: its heads check whether an
image shows what a prompt asked for, and its pooled embedding compares images (subject
similarity, Frechet distance). It ships as ``model.safetensors`` plus ``config.json``
(the label names of every head, so predictions never depend on code-side ordering).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .subjects import SUBJECTS
from .world import BACKGROUNDS, COLOURS, IMAGE_SIZE, SHAPES, Scene

FORMAT_VERSION = 1
EVALUATOR_DIR = Path(__file__).resolve().parent.parent / "assets" / "miniworld" / "evaluator"
NO_SUBJECT = "none"
HEADS = ("background", "shape", "colour", "subject")


@dataclass(frozen=True)
class EvaluatorConfig:
    """Architecture and label names; saved as ``config.json`` beside the weights."""

    widths: tuple[int, ...] = (16, 32, 64, 128)  # stem, then one stride-2 block per entry
    embed_dim: int = 64
    instance_dim: int = 0  # > 0: an instance-level embedding (trained contrastively), the world's DINO
    image_size: int = IMAGE_SIZE
    labels: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "background": tuple(BACKGROUNDS),
            "shape": tuple(SHAPES),
            "colour": tuple(COLOURS),
            "subject": (NO_SUBJECT, *SUBJECTS),
        }
    )
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if set(self.labels) != set(HEADS):
            raise ValueError(f"evaluator labels must name the heads {HEADS}, got {tuple(self.labels)}")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"evaluator format {self.format_version} is not {FORMAT_VERSION}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "EvaluatorConfig":
        data = json.loads(text)
        data["widths"] = tuple(data["widths"])
        data["labels"] = {k: tuple(v) for k, v in data["labels"].items()}
        return cls(**data)


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(min(8, c_out // 4), c_out), nn.SiLU()
    )


class Evaluator(nn.Module):
    """CNN: a stem, stride-2 blocks down to 4x4, global mean pool, an embedding, four heads."""

    def __init__(self, config: EvaluatorConfig = EvaluatorConfig()):
        super().__init__()
        self.config = config
        widths = config.widths
        blocks = [_conv(3, widths[0])]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            blocks += [_conv(c_in, c_out, stride=2), _conv(c_out, c_out)]
        self.features = nn.Sequential(*blocks)
        self.embed = nn.Linear(widths[-1], config.embed_dim)
        self.heads = nn.ModuleDict({h: nn.Linear(config.embed_dim, len(config.labels[h])) for h in HEADS})
        self.instance = nn.Linear(widths[-1], config.instance_dim) if config.instance_dim else None
        # (N, instance_dim) instance embeddings of images the paired diffusion model draws for
        # prompts without an identifier: the non-subjects that generated images are compared
        # with (see ``metrics.instance_threshold``); None until ``save_null_bank`` wrote one.
        self.generated_null: np.ndarray | None = None
        # (N,) the class noun (shape) each bank image was prompted with; None for a bank
        # written without them (then only the pooled bound applies)
        self.generated_null_shapes: np.ndarray | None = None

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (B, 3, H, W) in [0, 1]. Returns logits per head and ``embedding`` (B, D)."""
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="area")
        h = self.features(images * 2 - 1).mean(dim=(2, 3))  # (B, C)
        embedding = self.embed(h)  # (B, D)
        out = {name: head(F.silu(embedding)) for name, head in self.heads.items()}
        out["embedding"] = embedding
        if self.instance is not None:
            out["instance"] = F.normalize(self.instance(h), dim=-1)  # (B, D_i), unit length
        return out

    @torch.no_grad()
    def predict(self, images, batch_size: int = 256) -> "Predictions":
        """Class probabilities of every head and embeddings for a batch of images.

        Args:
            images: a list of PIL images, an (N, H, W, 3) uint8 array, or an
                (N, 3, H, W) float tensor in [0, 1].
        """
        batch = as_batch(images)
        outs = [self(batch[i : i + batch_size]) for i in range(0, len(batch), batch_size)]
        joined = {k: torch.cat([o[k] for o in outs]) for k in outs[0]} if outs else {}
        probs = {h: joined[h].softmax(-1).numpy() for h in HEADS} if outs else {}
        embedding = joined["embedding"].numpy() if outs else np.zeros((0, self.config.embed_dim))
        instance = joined["instance"].numpy() if outs and "instance" in joined else None
        return Predictions(self.config.labels, probs, embedding, instance)


@dataclass
class Predictions:
    """Evaluator outputs for N images: ``probs[head]`` (N, classes) and ``embedding`` (N, D)."""

    labels: dict[str, tuple[str, ...]]
    probs: dict[str, np.ndarray]
    embedding: np.ndarray
    instance: np.ndarray | None = None  # (N, D_i) instance-level embedding, when the evaluator has one

    @property
    def identity(self) -> np.ndarray:
        """The embedding that tells instances apart: the instance embedding when there is one."""
        return self.instance if self.instance is not None else self.embedding

    def names(self, head: str) -> list[str]:
        """The most probable label of ``head`` for each image."""
        return [self.labels[head][i] for i in self.probs[head].argmax(-1)]

    def probability(self, head: str, label: str) -> np.ndarray:
        """(N,) probability that each image shows ``label`` under ``head``."""
        return self.probs[head][:, self.labels[head].index(label)]


# --------------------------------------------------------------------------------------
# What the evaluator is trained and tested on
# --------------------------------------------------------------------------------------

def scene_labels(scenes: list[Scene], config: EvaluatorConfig) -> dict[str, torch.Tensor]:
    """Label indices per head for ``scenes``; colour is -100 (ignored) for two-colour looks."""
    labels = config.labels

    def index(head, name):
        return labels[head].index(name) if name is not None else -100

    return {
        "background": torch.tensor([index("background", s.background) for s in scenes]),
        "shape": torch.tensor([index("shape", s.thing.shape) for s in scenes]),
        "colour": torch.tensor([index("colour", s.colour) for s in scenes]),
        "subject": torch.tensor([index("subject", s.subject or NO_SUBJECT) for s in scenes]),
    }


def as_batch(images) -> torch.Tensor:
    """Images (PIL list, uint8 (N, H, W, 3) array, or float (N, 3, H, W) tensor) as a float
    (N, 3, H, W) tensor in [0, 1]."""
    if isinstance(images, torch.Tensor):
        return images.detach().float().cpu()
    if isinstance(images, np.ndarray):
        array = images
    else:
        array = np.stack([np.asarray(im.convert("RGB")) for im in images]) if len(images) else np.zeros((0, 1, 1, 3))
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float() / 255.0


def save_evaluator(model: Evaluator, folder: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``folder`` (temporary names, then renamed)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors.tmp"), metadata={"format_version": str(FORMAT_VERSION)})
    (folder / "config.json.tmp").write_text(model.config.to_json(), encoding="utf-8")
    os.replace(folder / "model.safetensors.tmp", folder / "model.safetensors")
    os.replace(folder / "config.json.tmp", folder / "config.json")
    return folder


NULL_BANK = "generated_null.safetensors"


def save_null_bank(folder: str | os.PathLike, embeddings: np.ndarray, metadata: dict[str, str],
                   shapes: Sequence[str] | None = None) -> Path:
    """Write the instance embeddings of a model's identifier-free generations into an
    evaluator folder (``generated_null.safetensors``; ``metadata``: where they came from;
    ``shapes``: the class noun each image was prompted with, for per-class thresholds)."""
    from safetensors.numpy import save_file

    arrays = {"instance": np.ascontiguousarray(embeddings, dtype=np.float32)}
    metadata = dict(metadata)
    if shapes is not None:
        if len(shapes) != len(embeddings):
            raise ValueError(f"{len(shapes)} shapes for {len(embeddings)} bank embeddings")
        names = sorted(set(shapes))
        arrays["shape"] = np.array([names.index(s) for s in shapes], dtype=np.int32)
        metadata["shapes"] = ",".join(names)
    path = Path(folder) / NULL_BANK
    tmp = path.with_name(path.name + ".tmp")
    save_file(arrays, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def load_evaluator(folder: str | os.PathLike | None = None) -> Evaluator:
    """Load the evaluator (default: the one bundled in ``qpdeploy/assets/miniworld/evaluator``),
    in eval mode on the CPU.

    Raises:
        FileNotFoundError: the folder has no ``config.json`` / ``model.safetensors``.
    """
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else EVALUATOR_DIR
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not (config_path.is_file() and weights_path.is_file()):
        raise FileNotFoundError(f"no miniworld evaluator in {folder} (config.json and model.safetensors expected)")
    model = Evaluator(EvaluatorConfig.from_json(config_path.read_text(encoding="utf-8")))
    model.load_state_dict(load_file(str(weights_path)))
    if (folder / NULL_BANK).is_file():
        from safetensors import safe_open

        with safe_open(str(folder / NULL_BANK), framework="numpy") as f:
            bank = f.get_tensor("instance")
            index = f.get_tensor("shape") if "shape" in f.keys() else None
            names = np.array((f.metadata() or {}).get("shapes", "").split(","))
        if model.instance is None or bank.ndim != 2 or bank.shape[1] != model.config.instance_dim:
            raise ValueError(f"{folder / NULL_BANK} does not match the evaluator's instance embedding "
                             f"({tuple(bank.shape)} vs (N, {model.config.instance_dim}))")
        model.generated_null = bank
        if index is not None:
            if index.shape != (len(bank),) or index.min(initial=0) < 0 or index.max(initial=0) >= len(names):
                raise ValueError(f"{folder / NULL_BANK}: its 'shape' labels do not match its embeddings or its metadata")
            model.generated_null_shapes = names[index]
    return model.eval()

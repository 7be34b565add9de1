"""The floating-point rest of a deploy dir: text encoder(s), VAE decoder, tokenizers, scheduler.

Graphs (batch dynamic, everything else fixed):

- ``text_encoder.onnx`` (and ``text_encoder_2.onnx`` for SDXL): input ``input_ids`` int32
  (batch, max_length); outputs ``last_hidden_state`` (batch, L, D), the pooled output (named
  ``pooler_output`` for a CLIPTextModel, ``text_embeds`` for a CLIPTextModelWithProjection,
  as in transformers) and ``penultimate_hidden_state`` (SDXL conditions on it).
- ``vae_decoder.onnx``: input ``latent`` float32 (batch, C, h, w), already divided by the
  VAE's scaling factor (as diffusers does before ``vae.decode``); output ``image`` float32
  (batch, 3, H, W) in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .tracing import save_onnx, torchscript_export
from .unet import TensorSpec


@dataclass
class PartFiles:
    """One exported float graph: its name, files and IO specs (and engine, filled later)."""

    name: str
    onnx: str
    files: list[str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    extra: dict = field(default_factory=dict)


class TextEncoderForExport(nn.Module):
    """(last hidden state, pooled output, penultimate hidden state) of a CLIP text encoder."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        out = self.encoder(input_ids, output_hidden_states=True, return_dict=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return out.last_hidden_state, pooled, out.hidden_states[-2]


class VAEDecoderForExport(nn.Module):
    """``vae.decode(latent)`` (post-quant conv + decoder) returning the image tensor."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


def export_text_encoder(encoder, tokenizer, name: str, out_dir, opset: int) -> PartFiles:
    """Write ``<name>.onnx`` for one CLIP text encoder (see the module docstring)."""
    length = tokenizer.model_max_length
    cfg = encoder.config
    pooled = "text_embeds" if "WithProjection" in type(encoder).__name__ else "pooler_output"
    pooled_dim = cfg.projection_dim if pooled == "text_embeds" else cfg.hidden_size
    inputs = [TensorSpec("input_ids", "int32", ("batch", length))]
    outputs = [TensorSpec("last_hidden_state", "float32", ("batch", length, cfg.hidden_size)),
               TensorSpec(pooled, "float32", ("batch", pooled_dim)),
               TensorSpec("penultimate_hidden_state", "float32", ("batch", length, cfg.hidden_size))]
    ids = torch.zeros(2, length, dtype=torch.int32)
    return _export(TextEncoderForExport(encoder), (ids,), name, inputs, outputs, out_dir, opset)


def export_vae_decoder(vae, latent_hw: tuple[int, int], scale_factor: int, out_dir, opset: int) -> PartFiles:
    """Write ``vae_decoder.onnx`` (see the module docstring)."""
    h, w = latent_hw
    channels = vae.config.latent_channels
    inputs = [TensorSpec("latent", "float32", ("batch", channels, h, w))]
    outputs = [TensorSpec("image", "float32", ("batch", vae.config.out_channels, h * scale_factor, w * scale_factor))]
    latent = torch.zeros(2, channels, h, w)
    part = _export(VAEDecoderForExport(vae), (latent,), "vae_decoder", inputs, outputs, out_dir, opset)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(vae.config).items()
              if not k.startswith("_")}
    # The whole diffusers config travels: pipelines read latents_mean / latents_std (SDXL-style
    # VAEs), scaling and shift factors and block_out_channels from it.
    part.extra = {"scaling_factor": vae.config.scaling_factor,
                  "shift_factor": getattr(vae.config, "shift_factor", None), "config": config}
    return part


def _export(module, args, name, inputs, outputs, out_dir, opset) -> PartFiles:
    model = torchscript_export(module, args, [s.name for s in inputs], [s.name for s in outputs], opset, out_dir,
                               dynamic_axes={s.name: {0: "batch"} for s in inputs + outputs})
    files = save_onnx(model, Path(out_dir) / f"{name}.onnx")
    return PartFiles(name, f"{name}.onnx", files, inputs, outputs)


def export_parts(pipe, out_dir, latent_hw: tuple[int, int], opset: int, progress=None) -> list[PartFiles]:
    """Text encoder(s), VAE decoder, tokenizer(s) and scheduler config of ``pipe`` into ``out_dir``.

    Returns:
        The exported graphs; each text encoder's ``extra["tokenizer"]`` names its tokenizer folder.
    """
    out_dir = Path(out_dir)
    parts = []
    for suffix in ("", "_2"):
        encoder, tokenizer = getattr(pipe, f"text_encoder{suffix}", None), getattr(pipe, f"tokenizer{suffix}", None)
        if encoder is None:
            continue
        part = export_text_encoder(encoder.eval(), tokenizer, f"text_encoder{suffix}", out_dir, opset)
        tokenizer.save_pretrained(str(out_dir / f"tokenizer{suffix}"))
        part.extra = {"tokenizer": f"tokenizer{suffix}"}
        parts.append(part)
        if progress is not None:
            progress()
    parts.append(export_vae_decoder(pipe.vae.eval(), latent_hw, pipe.vae_scale_factor, out_dir, opset))
    pipe.scheduler.save_pretrained(str(out_dir / "scheduler"))
    if progress is not None:
        progress()
    return parts


def pipeline_record(pipe) -> dict:
    """The pipeline class and its non-component config (for example SDXL's
    ``force_zeros_for_empty_prompt``), so a runtime can rebuild the same pipeline."""
    config = {k: v for k, v in dict(pipe.config).items()
              if not k.startswith("_") and not (isinstance(v, (list, tuple)) and len(v) == 2)}  # "_": private
    return {"class": type(pipe).__name__, "config": config}

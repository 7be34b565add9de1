"""Write a diffusers pipeline back into the original (LDM / CompVis) single-file layout.

Real single-file checkpoints cannot be downloaded in tests, so the single-file tests make
one from a tiny random pipeline. The key names here are the inverse of diffusers' own
converters (``diffusers.loaders.single_file_utils``: ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``), written out independently so that a round trip through
``from_single_file`` checks diffusers' conversion rather than repeating it.

Layout of the result:
- ``model.diffusion_model.*``: the UNet (``input_blocks`` / ``middle_block`` / ``output_blocks``);
- ``first_stage_model.*``: the VAE (``encoder.down.{i}.block.{j}``, ``mid.attn_1`` with 1x1 convs);
- SD 1.x: ``cond_stage_model.transformer.text_model.*`` (CLIP ViT-L in transformers' names);
- SDXL: ``conditioner.embedders.0.transformer.text_model.*`` (CLIP ViT-L) and
  ``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG names, fused ``in_proj`` q/k/v).
"""

from __future__ import annotations

import re

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
XL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# UNet tensors outside the blocks; label_emb is SDXL's add_embedding (size / crop / pooled text).
UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# ResBlock sub-layers: diffusers name -> LDM name (nn.Sequential indices in LDM).
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_TOP = {
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_norm_out": "decoder.norm_out",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def to_ldm_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The state dict of an SD 1.x or SDXL pipeline in the original single-file key layout.

    Args:
        pipe: a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (any number of
            blocks and ``layers_per_block``; UNet without ``class_embedding``).

    Returns:
        ``{ldm_key: tensor}`` (contiguous clones), ready for ``safetensors.torch.save_file``.

    Raises:
        KeyError: a tensor has no known LDM name (nothing is dropped silently).
    """
    state = {UNET_PREFIX + k: v for k, v in unet_state(pipe.unet).items()}
    n_vae_blocks = len(pipe.vae.config.up_block_types)
    for key, value in pipe.vae.state_dict().items():
        state[VAE_PREFIX + vae_key(key, n_vae_blocks)] = vae_value(key, value)
    if getattr(pipe, "text_encoder_2", None) is None:
        state.update(clip_state(pipe.text_encoder, SD1_CLIP_PREFIX))
    else:
        state.update(clip_state(pipe.text_encoder, XL_CLIP_PREFIX))
        state.update(open_clip_state(pipe.text_encoder_2, XL_OPEN_CLIP_PREFIX))
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def unet_state(unet) -> dict[str, torch.Tensor]:
    """A UNet2DConditionModel's tensors under their LDM names (without the prefix).

    Down block ``b`` layer ``l`` is ``input_blocks.{1 + b*(n+1) + l}`` (``.0`` resnet,
    ``.1`` transformer), and its downsampler the slot after its ``n`` layers. Up block ``b``
    layer ``l`` (``n+1`` layers) is ``output_blocks.{b*(n+1) + l}``; its upsampler sits in
    the last slot after the resnet (``.1``) or after the resnet and transformer (``.2``).
    """
    n = unet.config.layers_per_block
    stride = n + 1
    state = unet.state_dict()
    up_with_attention = {int(m[1]) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    mid = {"resnets.0": "middle_block.0", "attentions.0": "middle_block.1", "resnets.1": "middle_block.2"}
    out = {}
    for key, value in state.items():
        name, _, leaf = key.rpartition(".")
        if name in UNET_TOP:
            new = f"{UNET_TOP[name]}.{leaf}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", name):
            new = f"input_blocks.{1 + int(m[1]) * stride + n}.0.op.{leaf}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", name):
            b = int(m[1])
            new = f"output_blocks.{b * stride + n}.{2 if b in up_with_attention else 1}.conv.{leaf}"
        elif m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            side, b, kind, layer, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            slot = 1 + b * stride + layer if side == "down" else b * stride + layer
            blocks = "input_blocks" if side == "down" else "output_blocks"
            new = f"{blocks}.{slot}." + (f"0.{resnet_leaf(rest)}" if kind == "resnets" else f"1.{rest}")
        elif m := re.fullmatch(r"mid_block\.((?:resnets|attentions)\.\d)\.(.+)", key):
            kind, rest = m[1], m[2]
            new = f"{mid[kind]}." + (resnet_leaf(rest) if kind.startswith("resnets") else rest)
        else:
            raise KeyError(f"no LDM name for UNet tensor {key}")
        out[new] = value
    return out


def resnet_leaf(rest: str) -> str:
    """``conv1.weight`` -> ``in_layers.2.weight`` (a ResBlock's sub-layer in LDM names)."""
    layer, _, leaf = rest.rpartition(".")
    if layer not in UNET_RESNET:
        raise KeyError(f"no LDM name for resnet tensor {rest}")
    return f"{UNET_RESNET[layer]}.{leaf}"


def vae_key(key: str, n_blocks: int) -> str:
    """LDM name of an AutoencoderKL tensor (decoder up blocks are numbered in reverse)."""
    name, _, leaf = key.rpartition(".")
    if name in VAE_TOP:
        return f"{VAE_TOP[name]}.{leaf}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.{vae_block_rest(m[2], 'downsample')}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(.+)", key):
        return f"decoder.up.{n_blocks - 1 - int(m[1])}.{vae_block_rest(m[2], 'upsample')}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        if m[2] not in VAE_ATTENTION:
            raise KeyError(f"no LDM name for VAE tensor {key}")
        return f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
    if key.split(".")[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv"):
        return key  # conv_in / conv_out / (post_)quant_conv keep their names
    raise KeyError(f"no LDM name for VAE tensor {key}")


def vae_block_rest(rest: str, sampler: str) -> str:
    """``resnets.1.conv_shortcut.weight`` -> ``block.1.nin_shortcut.weight``; samplers renamed."""
    if rest.startswith(("downsamplers.0.", "upsamplers.0.")):
        return f"{sampler}.{rest.split('.', 2)[2]}"
    if rest.startswith("resnets."):
        return "block." + rest.removeprefix("resnets.").replace("conv_shortcut", "nin_shortcut")
    raise KeyError(f"no LDM name for VAE block tensor {rest}")


def vae_value(key: str, value: torch.Tensor) -> torch.Tensor:
    """LDM's VAE attention projections are 1x1 convolutions: (C, C) -> (C, C, 1, 1)."""
    if re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", key):
        return value[:, :, None, None]
    return value


def clip_state(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel under ``prefix + 'text_model.'`` (LDM keeps HF names)."""
    return {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}


def open_clip_state(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection in OpenCLIP names: fused q/k/v, transposed projection."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {
        prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
        prefix + "text_projection": state.pop("text_projection.weight").T,  # OpenCLIP: x @ P
    }
    for i in range(text_encoder.config.num_hidden_layers):
        layer, block = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            qkv = [state.pop(f"{layer}self_attn.{p}_proj.{leaf}") for p in "qkv"]
            out[f"{block}attn.in_proj_{leaf}"] = torch.cat(qkv)
        for name, ldm in OPEN_CLIP_LAYER.items():
            for leaf in ("weight", "bias"):
                out[f"{block}{ldm}.{leaf}"] = state.pop(f"{layer}{name}.{leaf}")
    if state:
        raise KeyError(f"no OpenCLIP name for {sorted(state)[:3]}")
    return out

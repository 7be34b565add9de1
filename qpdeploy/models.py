"""Load a Stable Diffusion pipeline from a local path or a bundled name, never the network.

MODEL may be:
- a local diffusers directory (``model_index.json`` at its root): SD 1.x, 2.x, XL, or any
  pipeline whose ``unet`` is a ``UNet2DConditionModel``;
- a single-file checkpoint (``.safetensors``; ``.ckpt`` is refused because it is a pickle),
  converted by diffusers' ``from_single_file``; its configuration comes from ``config_dir``
  (a local diffusers directory of the same architecture) or from the local Hugging Face cache;
- a bundled name: ``tiny-sd1``, ``tiny-sd2``, ``tiny-sdxl`` (random weights built from a
  config with a fixed seed: for tests and smoke runs) or ``miniworld`` (the small model
  trained here and shipped in ``qpdeploy/assets``; the default MODEL).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import QPDeployError
from .prompts import CALIBRATION_PROMPTS

TINY_FAMILIES = ("sd1", "sd2", "sdxl")
ASSETS = Path(__file__).parent / "assets"
MINIWORLD_DIR = ASSETS / "miniworld" / "pipeline"
DEFAULT_MODEL = "miniworld"  # the trained small model shipped in qpdeploy/assets
BUNDLED = tuple(f"tiny-{f}" for f in TINY_FAMILIES) + ("miniworld",)


def load_pipeline(model: str | os.PathLike, config_dir: str | os.PathLike | None = None, **components):
    """Load a diffusers pipeline for MODEL (see module docstring), in float32 on the CPU.

    ``components`` (for example ``unet=quantized_unet``) replace the model's own and are
    then not loaded from disk.

    Raises:
        QPDeployError: the path is missing, is not a diffusion model, or its UNet is not
            a ``UNet2DConditionModel``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a missing local file must never become a download
    name = str(model)
    if name in BUNDLED and not Path(name).exists():
        pipe = _load_bundled(name, components)
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise QPDeployError(
                f"model not found: {path} (give a diffusers directory, a .safetensors checkpoint, "
                f"or one of {', '.join(BUNDLED)})"
            )
        if path.is_dir():
            pipe = _load_directory(path, components)
        else:
            pipe = _load_single_file(path, config_dir, components)
    check_unet(pipe, name)
    return pipe


MAX_SIZE_FACTOR = 4  # image sides up to 4x the model's native resolution


def native_resolution(pipe) -> int:
    """The model's native image size: UNet sample size times the VAE downscaling factor."""
    return int(pipe.unet.config.sample_size) * vae_factor(pipe)


def vae_factor(pipe) -> int:
    """How many pixels one latent cell spans per side."""
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def size_bounds(unet_config, factor: int) -> tuple[int, int]:
    """``(multiple, largest)`` image side of a UNet (diffusers config) under a VAE of scale
    ``factor``: every down block but the last halves the latent, and sizes that do not divide
    make diffusers pick upsampling sizes at trace time; sides go up to
    :data:`MAX_SIZE_FACTOR` times the native resolution."""
    multiple = factor * 2 ** (len(unet_config["down_block_types"]) - 1)
    return multiple, MAX_SIZE_FACTOR * int(unet_config["sample_size"]) * factor


def check_resolution(pipe, value: int | None, what: str = "resolution") -> None:
    """Refuse an image side the model cannot take, before anything is allocated.

    Raises:
        QPDeployError: ``value`` is not a positive multiple of :func:`size_bounds`' multiple or is
            above :data:`MAX_SIZE_FACTOR` times the native resolution.
    """
    if value is None:
        return
    multiple, largest = size_bounds(pipe.unet.config, vae_factor(pipe))
    if not multiple <= value <= largest or value % multiple:
        raise QPDeployError(f"{what} must be a multiple of {multiple} between {multiple} and {largest} for this "
                            f"model (native {native_resolution(pipe)}), got {value}")


def check_unet(pipe, name: str) -> None:
    """Refuse pipelines whose denoiser is not a UNet2DConditionModel (DiT, video UNets...)."""
    from diffusers import UNet2DConditionModel

    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, UNet2DConditionModel):
        kind = type(unet).__name__ if unet is not None else type(getattr(pipe, "transformer", pipe)).__name__
        raise QPDeployError(
            f"unsupported architecture in {name}: the denoiser is {kind}, "
            "qpdeploy quantizes UNet2DConditionModel (SD 1.x, 2.x, XL)"
        )


def _load_directory(path: Path, components: dict):
    from diffusers import DiffusionPipeline

    if not (path / "model_index.json").is_file():
        raise QPDeployError(f"not a diffusers model directory: {path} has no model_index.json")
    try:
        return DiffusionPipeline.from_pretrained(path, local_files_only=True, safety_checker=None, **components)
    except Exception as exc:  # diffusers raises many types; the user needs one line
        raise QPDeployError(f"cannot load diffusers model {path}: {_first_line(exc)}") from exc


def _load_single_file(path: Path, config_dir, components: dict):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS, infer_diffusers_model_type
    from huggingface_hub import snapshot_download
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise QPDeployError(
            f"unsupported checkpoint file {path}: give a .safetensors file "
            "(.ckpt/.pt files are pickles and are not loaded)"
        )
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise QPDeployError(f"cannot read checkpoint {path}: {_first_line(exc)}") from exc
    if not any(k.startswith("model.diffusion_model.") for k in state):
        raise QPDeployError(
            f"not a Stable Diffusion checkpoint: {path} has no 'model.diffusion_model.*' UNet weights"
        )
    model_type = infer_diffusers_model_type(state)
    del state
    # from_single_file turns a config it cannot find locally into a download (whatever
    # local_files_only says), so it is only ever given an existing local directory.
    if config_dir is not None:
        config_dir = Path(config_dir).expanduser()
        if not (config_dir / "model_index.json").is_file():
            raise QPDeployError(f"config directory {config_dir} is not a diffusers model (no model_index.json)")
    else:
        repo = DIFFUSERS_DEFAULT_PIPELINE_PATHS.get(model_type, {}).get("pretrained_model_name_or_path", model_type)
        try:
            config_dir = Path(snapshot_download(repo, local_files_only=True))
        except Exception as exc:
            raise QPDeployError(
                f"cannot load checkpoint {path}: the configs of {repo} are not in the local Hugging Face "
                "cache; pass --config DIR (a local diffusers model of the same architecture)"
            ) from exc
    is_xl = model_type.startswith("xl")
    kwargs = {"local_files_only": True, "config": str(config_dir)}
    if not is_xl:  # qpdeploy never runs the safety checker, and skipping it needs no extra files
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    try:
        return cls.from_single_file(str(path), **{**kwargs, **components})
    except Exception as exc:  # diffusers raises many types; the user needs one line
        raise QPDeployError(f"cannot load checkpoint {path} with configs {config_dir}: {_first_line(exc)}") from exc


def _load_bundled(name: str, components: dict):
    if name == "miniworld":
        if not (MINIWORLD_DIR / "model_index.json").is_file():
            raise QPDeployError(f"the bundled miniworld model is not installed (expected {MINIWORLD_DIR})")
        return _load_directory(MINIWORLD_DIR, components)
    pipe = tiny_pipeline(name.removeprefix("tiny-"))
    for key, module in components.items():
        setattr(pipe, key, module)
    return pipe


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0] if text else ''}"


# --------------------------------------------------------------------------------------
# Tiny pipelines built from configs (the diffusers testing habit: no download, fixed seed)
# --------------------------------------------------------------------------------------

def tiny_unet_config(family: str) -> dict:
    """UNet2DConditionModel kwargs of a tiny model with the structure of an SD family.

    sd1: conv projections, one head dim; sd2: linear projections and per-block head dims;
    sdxl: sd2 plus ``text_time`` added embeddings and two transformer layers in the
    deepest block.
    """
    if family not in TINY_FAMILIES:
        raise QPDeployError(f"unknown tiny family {family!r}; expected one of {', '.join(TINY_FAMILIES)}")
    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    if family in ("sd2", "sdxl"):
        config.update(attention_head_dim=(2, 4), use_linear_projection=True)
    if family == "sdxl":
        config.update(
            cross_attention_dim=64,  # two text encoders of width 32, concatenated
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled text + 6 size/crop ids
            transformer_layers_per_block=(1, 2),
        )
    return config


def tiny_pipeline(family: str = "sd1", seed: int = 0):
    """A complete random pipeline of the given family (16x16 images, 8x8 latents).

    The same seed always gives the same weights, so tests and hashes are reproducible.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .tokenizer import build_word_tokenizer

    unet_config = tiny_unet_config(family)
    words = sorted({w.strip(",.") for p in CALIBRATION_PROMPTS for w in p.split()} | {"sks", "photo"})
    tokenizer = build_word_tokenizer(words, max_length=16)
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=16,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config)) if family == "sdxl" else None
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    if family == "sdxl":
        return StableDiffusionXLPipeline(**parts, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def model_family(unet) -> str:
    """'sdxl' for UNets with text_time added embeddings, 'sd2' for linear projections, else 'sd1'."""
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    return "sd2" if unet.config.use_linear_projection else "sd1"


def describe_source(model: str | os.PathLike) -> dict:
    """JSON-able description of where a model came from (recorded in quant_config.json)."""
    name = str(model)
    if name in BUNDLED and not Path(name).exists():
        return {"kind": "bundled", "name": name}
    path = Path(name).expanduser().resolve()
    return {"kind": "directory" if path.is_dir() else "single-file", "path": str(path)}


def model_folder(pipe) -> Path | None:
    """The folder a pipeline was loaded from (where a model keeps its own extra files:
    calibration prompts, recommended sampling), or None for one built in memory."""
    root = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    return Path(root) if root else None


SAMPLING_FILE = "qpdeploy_sampling.json"  # a model folder's recommended sampling settings
SAMPLING_KEYS = {"guidance": float, "steps": int}
FALLBACK_SAMPLING = {"guidance": 7.5, "steps": 25}  # a folder without a recommendation: Stable Diffusion's usual


def model_sampling_defaults(pipe) -> dict:
    """The sampling settings a model folder recommends (``qpdeploy_sampling.json`` beside its
    ``model_index.json``: ``{"guidance": 4.0, "steps": 25}``), or {} when it has none.
    ``qpdeploy export`` records them in the deploy dir; ``generate`` and ``evaluate`` use them
    when the user gives none.

    Raises:
        QPDeployError: the file is not a JSON object of those keys with numbers in range.
    """
    import json

    folder = model_folder(pipe)
    path = folder / SAMPLING_FILE if folder is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise QPDeployError(f"cannot read {path}: {type(exc).__name__}") from None
    return check_sampling_defaults(data, path)


def resolve_sampling(recommended: dict, steps: int | None = None, guidance: float | None = None) -> tuple[int, float]:
    """``(steps, guidance)``: the ones given, else the ``recommended`` ones (a model folder's,
    :func:`model_sampling_defaults`, or a deploy dir's record of it), else :data:`FALLBACK_SAMPLING`."""
    fallback = {**FALLBACK_SAMPLING, **recommended}
    return (int(steps if steps is not None else fallback["steps"]),
            float(guidance if guidance is not None else fallback["guidance"]))


def check_sampling_defaults(data, where) -> dict:
    """Validate a recommended-sampling record (see :func:`model_sampling_defaults`)."""
    ok = isinstance(data, dict) and set(data) <= set(SAMPLING_KEYS) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in data.values())
    ok = ok and 0 <= data.get("guidance", 0) <= 100 and 1 <= data.get("steps", 1) <= 1000
    if not ok or ("steps" in data and not isinstance(data["steps"], int)):
        raise QPDeployError(f"{where}: expected {{\"guidance\": 0..100, \"steps\": 1..1000}}, got {data!r:.80}")
    return {k: SAMPLING_KEYS[k](v) for k, v in data.items()}

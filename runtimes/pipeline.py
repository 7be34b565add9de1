"""A diffusers pipeline built from a deploy dir alone: ONNX text encoder(s) and VAE decoder,
tokenizer(s) and scheduler config from files, and :class:`~.unet.EngineUNet`.

``qpdeploy generate`` samples with diffusers' own StableDiffusionPipeline /
StableDiffusionXLPipeline around these modules rather than with a loop of its own: there is
one denoising loop (noise from the seeded generator, ``init_noise_sigma``,
``scale_model_input``, the guidance formula, every scheduler's ``step``), so ``generate`` and
``pipe.unet = EngineUNet...`` in user code cannot drift apart, and DDIM, PNDM, DPM-Solver++,
Euler and SDXL's added conditions all work as diffusers defines them.

The part modules give pipelines what they read from transformers' CLIP models and diffusers'
AutoencoderKL: ``config``, ``dtype``, ``device``, and outputs indexable like theirs.
"""

from __future__ import annotations

import inspect
import time
import weakref

import torch

from qpdeploy.errors import QPDeployError

from .config import RuntimeConfig
from .unet import DiffusersFacade, EngineUNet

SCHEDULER_CLASSES = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "dpm": "DPMSolverMultistepScheduler",
                     "euler": "EulerDiscreteScheduler"}
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


class _PartModule(DiffusersFacade):
    """An ONNX (or TensorRT) graph as a torch module: owns its active runner, times its calls."""

    def __init__(self, runner, record: dict):
        from diffusers.configuration_utils import FrozenDict

        super().__init__()
        self.runner, self.record = runner, record
        self.outputs = [spec["name"] for spec in record["outputs"]]
        self.seconds = 0.0
        self._config = FrozenDict(self.make_config())
        runner.activate()
        self._finalizer = weakref.finalize(self, runner.deactivate)

    def make_config(self) -> dict:
        return {}

    def run(self, feeds: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        out = self.runner.infer({k: v.cpu().contiguous() for k, v in feeds.items()}, check_inputs=False)
        self.seconds += time.perf_counter() - start
        return {k: v.to(device) for k, v in out.items()}

    def close(self) -> None:
        self._finalizer()


class OnnxTextEncoder(_PartModule):
    """A CLIP text encoder graph answering like ``CLIPTextModel`` / ``CLIPTextModelWithProjection``:
    ``[0]`` is the last hidden state (or, with projection, the text embeddings), and
    ``hidden_states[-2]`` the penultimate layer SDXL conditions on. (Only those two hidden
    states exist, so ``clip_skip`` is not available.)"""

    def make_config(self) -> dict:
        last = self.record["outputs"][0]["shape"]
        pooled = self.record["outputs"][1]
        config = {"hidden_size": last[-1], "max_position_embeddings": last[1]}
        if pooled["name"] == "text_embeds":
            config["projection_dim"] = pooled["shape"][-1]
        return config

    def forward(self, input_ids, attention_mask=None, output_hidden_states=None, return_dict=None, **_):
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.clip.modeling_clip import CLIPTextModelOutput

        length = self.record["inputs"][0]["shape"][1]
        if input_ids.shape[-1] != length:
            raise QPDeployError(f"{self.record['onnx']} takes {length} token ids per prompt, got {input_ids.shape[-1]}")
        out = self.run({"input_ids": input_ids.to(torch.int32)}, input_ids.device)
        last, pooled, penultimate = (out[name] for name in self.outputs)
        hidden = (penultimate, last)
        if "projection_dim" in self.config:
            return CLIPTextModelOutput(text_embeds=pooled, last_hidden_state=last, hidden_states=hidden)
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden)


class OnnxVAEDecoder(_PartModule):
    """The VAE decoder graph answering like ``AutoencoderKL.decode`` (input already divided by
    the scaling factor, output in [-1, 1])."""

    def make_config(self) -> dict:
        # The exported VAE's own diffusers config: pipelines read scaling / shift factors,
        # latents_mean / latents_std (SDXL-style VAEs) and block_out_channels from it.
        return {**self.record["config"], "force_upcast": False}

    def decode(self, z, return_dict: bool = True, generator=None):
        from diffusers.models.autoencoders.vae import DecoderOutput

        expected = self.record["inputs"][0]["shape"][1:]
        if list(z.shape[1:]) != list(expected):
            raise QPDeployError(f"{self.record['onnx']} decodes latents of shape {expected}, got {list(z.shape[1:])}")
        image = self.run({"latent": z.to(torch.float32)}, z.device)[self.outputs[0]]
        return DecoderOutput(sample=image) if return_dict else (image,)

    def forward(self, z):
        return self.decode(z, return_dict=False)[0]


def load_scheduler(folder, name: str | None = None):
    """The deploy dir's scheduler, or the one named (``ddim``, ``pndm``, ``dpm``, ``euler``)
    configured from the deploy dir's ``scheduler_config.json`` (PNDM skips its Runge-Kutta
    warm-up steps, as Stable Diffusion's own PNDM config does)."""
    import diffusers

    from qpdeploy.io import read_json

    path = folder / "scheduler_config.json"
    config = read_json(path)
    if not isinstance(config, dict):
        raise QPDeployError(f"{path}: expected a JSON object")
    cls_name = config.get("_class_name") if name is None else SCHEDULER_CLASSES[name]
    cls = getattr(diffusers, cls_name, None) if isinstance(cls_name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise QPDeployError(f"{path} names {cls_name!r}, which is not a diffusers scheduler")
    extra = {"skip_prk_steps": True} if cls_name == "PNDMScheduler" else {}
    try:
        return cls.from_config(config, **extra)
    except (TypeError, ValueError, KeyError) as exc:
        raise QPDeployError(f"{path}: cannot configure {cls_name} ({exc.__class__.__name__})") from None


def load_tokenizer(folder):
    """The tokenizer saved in a deploy dir (AutoTokenizer, local files only)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types
        raise QPDeployError(f"cannot load the tokenizer in {folder}: {type(exc).__name__}") from None


def load_deploy_pipeline(manifest, config: RuntimeConfig, scheduler: str | None = None, subject: str | None = None):
    """The diffusers pipeline of a deploy dir (see module doc); its modules own active runners
    (free them with :func:`close_pipeline`). ``subject``: the subject of a multi-subject
    deploy dir whose scales the UNet uses (None: post-training scales).

    Raises:
        QPDeployError: an unsupported pipeline class, or any runner that cannot load.
    """
    from .runners import check_backend, part_runner

    check_backend(manifest, config)
    manifest.subject_dispatch(subject)  # an unknown subject fails before anything loads
    return assemble_pipeline(manifest, scheduler, lambda record: part_runner(manifest, record, config),
                             lambda: EngineUNet.from_manifest(manifest, config, subject))


def assemble_pipeline(manifest, scheduler: str | None, make_runner, make_unet):
    """The diffusers pipeline of a deploy dir around runners made elsewhere: ``make_runner(part
    record)`` gives each float part's runner, ``make_unet()`` the UNet module (an
    :class:`EngineUNet`). :func:`load_deploy_pipeline` passes local engines; the Triton
    pipeline model passes runners that call the repository's other models."""
    import diffusers

    record = manifest.pipeline
    if record["class"] not in PIPELINES:
        raise QPDeployError(f"deploy dir {manifest.path} holds a {record['class']}; generate runs "
                            f"{' and '.join(PIPELINES)}")
    parts = {"scheduler": load_scheduler(manifest.scheduler_folder, scheduler)}
    try:
        for entry in manifest.text_encoders:
            suffix = entry["name"].removeprefix("text_encoder")
            parts[f"tokenizer{suffix}"] = load_tokenizer(manifest.file(entry["tokenizer"]))
            parts[entry["name"]] = OnnxTextEncoder(make_runner(entry), entry)
        vae = manifest.vae_decoder
        parts["vae"] = OnnxVAEDecoder(make_runner(vae), vae)
        parts["unet"] = make_unet()
    except BaseException:
        _close_parts(parts)
        raise
    cls = getattr(diffusers, record["class"])
    accepted = inspect.signature(cls.__init__).parameters
    options = {k: v for k, v in record.get("config", {}).items() if k in accepted}
    if "add_watermarker" in accepted:
        options["add_watermarker"] = False
    for optional in ("safety_checker", "feature_extractor", "image_encoder"):
        if optional in accepted:
            options.setdefault(optional, None)
    if "requires_safety_checker" in accepted:
        options["requires_safety_checker"] = False
    pipe = cls(**parts, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def close_pipeline(pipe) -> None:
    """Free every runner of a pipeline made by :func:`load_deploy_pipeline`."""
    _close_parts(dict(pipe.components))


def _close_parts(parts: dict) -> None:
    for module in parts.values():
        if isinstance(module, (_PartModule, EngineUNet)):
            module.close()

"""``EngineUNet``: a deploy dir's UNet engines as a drop-in ``pipe.unet`` for diffusers pipelines.

    pipe = StableDiffusionPipeline.from_pretrained(local_dir)
    pipe.unet = qpdeploy.runtimes.EngineUNet.from_deploy("deploy/", backend="ort")
    image = pipe("a sks dog in a bucket").images[0]

It offers what StableDiffusionPipeline and StableDiffusionXLPipeline read from a UNet: ``config``
(the exported UNet's diffusers config, with ``sample_size`` set to the exported latent size so
the pipeline's default image size is the one the graphs take), ``dtype``, ``device``,
``add_embedding.linear_1.in_features`` (SDXL's size check), and ``forward`` with the
UNet2DConditionModel signature and return type. Each call goes through the
:class:`~.scheduler.IntervalEngines`, which records the interval and engine of every step.
"""

from __future__ import annotations

import weakref
from types import SimpleNamespace

import torch
from torch import nn

from qpdeploy.errors import QPDeployError

from .config import RuntimeConfig
from .engines import IntervalEngines


class DiffusersFacade(nn.Module):
    """What diffusers pipelines read from the modules they call: a frozen ``config``, a
    float32 ``dtype`` and the ``device`` their inputs come from (``feed_device``)."""

    feed_device = torch.device("cpu")
    _config: dict

    @property
    def config(self):
        return self._config

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.feed_device


class EngineUNet(DiffusersFacade):
    """The UNet of a deploy dir behind the interface diffusers pipelines call.

    Build it with :meth:`from_deploy`. ``history`` holds one record per call; ``summary()``
    turns it into the image record's keys; ``close()`` (or garbage collection) frees the
    engines.
    """

    subject: str | None = None  # the multi-subject deploy dir's subject every call uses (from_deploy)

    def __init__(self, manifest, engines: IntervalEngines, feed_device, runtime: RuntimeConfig | None = None):
        from diffusers.configuration_utils import FrozenDict

        super().__init__()
        self.manifest, self.engines, self.runtime = manifest, engines, runtime
        self.specs = {spec["name"]: spec for spec in manifest.unet_inputs}
        self.feed_device = torch.device(feed_device)
        config = dict(manifest.unet_config)
        h, w = self.specs["sample"]["shape"][2:]
        config["sample_size"] = h if h == w else [h, w]
        self._config = FrozenDict(config)
        if config.get("addition_embed_type") == "text_time":
            # SDXL pipelines check the added-embedding width against this layer's input size.
            width = config["projection_class_embeddings_input_dim"]
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=width))
        self._finalizer = weakref.finalize(self, engines.close)

    @classmethod
    def from_deploy(cls, path, backend: str = "ort", config: RuntimeConfig | None = None, subject: str | None = None,
                    **options) -> "EngineUNet":
        """Open a deploy dir's UNet engines.

        Args:
            path: the deploy dir.
            backend: "ort", "trt" or "torch" (ignored when ``config`` is given).
            subject: in a multi-subject deploy dir, the subject (identifier word) whose scale
                sets every call uses (None: the post-training scales).
            config: a full :class:`RuntimeConfig`; otherwise one is built from ``backend``
                and ``options`` (for example ``low_memory=True``, ``threads=1``, or
                ``base=..., pack=...`` for the torch backend).

        Raises:
            QPDeployError: a missing or altered file, an unavailable backend, engines built
                for another machine (one line naming the file or value).
        """
        from qpdeploy.exporters.manifest import read_manifest

        config = config if config is not None else RuntimeConfig(backend=backend, **options)
        manifest = read_manifest(path, verify_hashes=config.verify_hashes)
        return cls.from_manifest(manifest, config, subject)

    @classmethod
    def from_manifest(cls, manifest, config: RuntimeConfig, subject: str | None = None) -> "EngineUNet":
        """Like :meth:`from_deploy` for an already read (and verified) manifest."""
        from .runners import feed_device, unet_runners

        dispatch = manifest.subject_dispatch(subject)  # an unknown subject fails before any engine loads
        runners, runner_of_interval = unet_runners(manifest, config)
        device = feed_device(config)
        constants = {}
        if manifest.layout == "multi-subject":
            from qpdeploy.exporters.subjects import load_tables

            constants = {name: t.to(device) for name, t in load_tables(manifest).tables.items()}
        engines = IntervalEngines(manifest.intervals, runners, runner_of_interval, dispatch,
                                  manifest.unet_output, config.low_memory, constants)
        engines.open()
        unet = cls(manifest, engines, device, config)
        unet.subject = subject
        return unet

    # -- calls -------------------------------------------------------------------------

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                down_block_additional_residuals=None, mid_block_additional_residual=None,
                down_intrablock_additional_residuals=None, encoder_attention_mask=None, return_dict: bool = True):
        """UNet2DConditionModel's call: ``sample`` (B, C, h, w), ``timestep`` scalar or (B,),
        ``encoder_hidden_states`` (B, L, D), SDXL's ``added_cond_kwargs``. Returns
        ``UNet2DConditionOutput(sample=noise_pred)`` or ``(noise_pred,)``."""
        extras = {"class_labels": class_labels, "timestep_cond": timestep_cond, "attention_mask": attention_mask,
                  "cross_attention_kwargs": cross_attention_kwargs,
                  "down_block_additional_residuals": down_block_additional_residuals,
                  "mid_block_additional_residual": mid_block_additional_residual,
                  "down_intrablock_additional_residuals": down_intrablock_additional_residuals,
                  "encoder_attention_mask": encoder_attention_mask}
        given = [name for name, value in extras.items() if value is not None]
        if given:
            raise QPDeployError(f"EngineUNet runs the exported UNet graphs, which take no {', '.join(given)} "
                                "(ControlNet, adapters and LoRA scales are not part of a deploy dir)")
        batch = sample.shape[0]
        timesteps = torch.as_tensor(timestep).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(batch)
        elif timesteps.numel() != batch:
            raise QPDeployError(f"got {timesteps.numel()} timesteps for a batch of {batch}")
        feeds = {"sample": sample, "timestep": timesteps, "encoder_hidden_states": encoder_hidden_states}
        if "text_embeds" in self.specs:
            if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs:
                raise QPDeployError("this deploy dir's UNet (SDXL) needs added_cond_kwargs text_embeds and time_ids")
            feeds.update(text_embeds=added_cond_kwargs["text_embeds"], time_ids=added_cond_kwargs["time_ids"])
        feeds = {name: self._feed(name, value) for name, value in feeds.items()}
        noise = self.engines(feeds, timesteps.cpu()).to(sample.device, sample.dtype)
        if not return_dict:
            return (noise,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=noise)

    def _feed(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """``value`` as the graph takes it (dtype, device), after checking its fixed dims."""
        spec = self.specs[name]
        expected = spec["shape"][1:]
        if list(value.shape[1:]) != list(expected):
            raise QPDeployError(self._shape_error(name, list(value.shape[1:]), expected))
        return value.to(self.feed_device, getattr(torch, spec["dtype"])).contiguous()

    def _shape_error(self, name: str, got, expected) -> str:
        where = self.manifest.path
        if name == "sample":
            factor = self.manifest.vae_scale_factor
            exported = "{}x{}".format(*self.manifest.size)
            return (f"image size {got[1] * factor}x{got[2] * factor} (latent {got[1]}x{got[2]}) is not the size "
                    f"deploy dir {where} was exported for: {exported} (the graphs have fixed spatial shapes; "
                    "re-export with --height/--width)")
        return f"{name} of shape {got} does not fit deploy dir {where}, whose UNet takes {expected} (batch first)"

    # -- records and lifetime ----------------------------------------------------------

    @property
    def history(self):
        """One :class:`~.engines.EngineCall` per call since the last :meth:`reset_history`."""
        return self.engines.history

    def reset_history(self) -> None:
        self.engines.history.clear()

    def summary(self) -> dict:
        """Intervals, engines, per-step seconds and switch time of the recorded calls."""
        return self.engines.summary()

    def expect(self, timesteps) -> None:
        """Announce the coming timesteps (low-memory mode prepares the right engine next)."""
        self.engines.expect(timesteps)

    def close(self) -> None:
        """Free every engine (also done when the object is garbage collected)."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

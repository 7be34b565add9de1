"""``qpdeploy evaluate``: subject and prompt fidelity of any model, with confidence intervals.

A model is a deploy dir (run by the runtime, as ``generate`` runs it) or a quantized base with
an optional scale pack (run in PyTorch, with the pack's identifier rows when it has them). It
draws ``images_per_prompt`` images of every prompt of a prompts file and scores each image:

- ``miniworld`` metrics (the bundled model's yardstick, :mod:`qpdeploy.miniworld.metrics`):
  ``prompt_match`` (background, shape, colour as prompted) and, for a subject,
  ``subject_recognised`` (instance embedding above the 99th percentile of non-subjects) and
  ``subject_cosine``. Prompts must be miniworld captions.
- ``encoders`` metrics (the DreamBooth paper's, for real models): ``clip_t`` (CLIP cosine of
  image and prompt, the identifier word left out: CLIP does not know it), ``clip_i`` and ``dino`` (mean cosine of the image to the instance
  images under CLIP's image tower and a DINO ViT's class token). The CLIP and DINO models are
  transformers checkpoints given by local path; nothing is downloaded.

Every metric is reported as a mean with a 95% bootstrap interval over prompts and images
(:func:`qpdeploy.miniworld.stats.bootstrap_mean`), and per prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import MAX_STEPS, ConfigBase, check_all, is_full_strength, strength_problem
from .errors import QPDeployError
from .models import resolve_sampling

MINIWORLD_GUIDANCE, ENCODER_GUIDANCE = 4.0, 7.5  # sampling defaults of the two metric sets
EVALUATION_KIND = "qpdeploy.evaluation"
EVALUATION_FORMAT_VERSION = 1
EVALUATION_ARTIFACT = ("report.json", EVALUATION_KIND)  # header file and kind: what --force may replace


@dataclass(frozen=True)
class EvaluateConfig(ConfigBase):
    """Sampling and scoring settings of one evaluation.

    Attributes:
        images_per_prompt: images drawn per prompt (image i of a prompt starts from noise
            seeded with (seed, its index in the run)).
        steps, guidance: sampling; None: the model's recommendation (its deploy dir's or
            model folder's ``qpdeploy_sampling.json``), else 25 steps and guidance 4 for
            miniworld metrics, 7.5 for encoders.
        identifier: the subject's word; with miniworld metrics a bundled subject's, or any
            word when ``instance_images`` are given.
        pack_strength: how much of ``--pack`` is applied (:func:`qpdeploy.pack.at_strength`;
            a deploy dir holds the strength it was exported with).
    """

    images_per_prompt: int = 4
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    identifier: str | None = None
    pack_strength: float | tuple[float, ...] = 1.0

    def __post_init__(self):
        check_all([
            (strength_problem(self.pack_strength) is None, strength_problem(self.pack_strength)),
            (1 <= self.images_per_prompt <= 1024, f"images per prompt must be in 1..1024, got {self.images_per_prompt}"),
            (self.steps is None or 1 <= self.steps <= MAX_STEPS, f"steps must be in 1..{MAX_STEPS}, got {self.steps}"),
            (self.guidance is None or self.guidance >= 0, f"guidance must be >= 0, got {self.guidance}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
        ])


# --------------------------------------------------------------------------------------
# Scorers: per-image values
# --------------------------------------------------------------------------------------

class MiniworldScorer:
    """The bundled miniworld evaluator (see module doc)."""

    name = "miniworld"
    guidance = MINIWORLD_GUIDANCE

    def __init__(self, evaluator=None):
        from .miniworld.evaluator import load_evaluator

        self.evaluator = evaluator if evaluator is not None else load_evaluator()

    def check(self, prompts: list[str], identifier: str | None, instance_images) -> None:
        """Refuse prompts that are not miniworld captions, or a subject without instances."""
        from .miniworld.prompts import parse_prompt
        from .miniworld.subjects import SUBJECTS

        for prompt in prompts:
            try:
                parse_prompt(prompt)
            except ValueError as exc:
                raise QPDeployError(f"{exc}; for other models give --clip and/or --dino") from None
        if identifier is not None and instance_images is None and identifier not in SUBJECTS:
            raise QPDeployError(f"{identifier!r} is not a bundled miniworld subject ({', '.join(SUBJECTS)}); "
                                "give its --instance-images")

    def score(self, images: np.ndarray, prompts: list[str], identifier: str | None, instance_images) -> dict:
        from .miniworld import metrics
        from .miniworld.prompts import parse_prompt

        specs = [parse_prompt(p) for p in prompts]
        out = {"prompt_match": metrics.prompt_matches(self.evaluator, images, specs)}
        if identifier is not None:
            # a subject the package does not ship is bounded by its class when the prompts name one
            shapes = {spec.shape for spec in specs}
            shape = shapes.pop() if len(shapes) == 1 else None
            scores = metrics.subject_scores(self.evaluator, images, identifier, instance_images, shape=shape)
            out["subject_recognised"] = scores.get("instance_recognised", scores["recognised"])
            out["subject_cosine"] = scores.get("instance_cosine", scores["cosine"])
        return out


class EncoderScorer:
    """CLIP-T, CLIP-I and DINO from local transformers checkpoints (see module doc)."""

    name = "encoders"
    guidance = ENCODER_GUIDANCE

    def __init__(self, clip=None, dino=None, device="cpu"):
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

        if clip is None and dino is None:
            raise QPDeployError("encoder metrics need --clip PATH and/or --dino PATH (local transformers models)")
        self.device = torch.device(device)
        self.clip = self.dino = None
        if clip is not None:
            self.clip = _load(CLIPModel, clip, "--clip").to(self.device).eval()
            self.clip_tokenizer = _load(AutoTokenizer, clip, "--clip")
            self.clip_images = _load(AutoImageProcessor, clip, "--clip")
        if dino is not None:
            self.dino = _load(AutoModel, dino, "--dino").to(self.device).eval()
            self.dino_images = _load(AutoImageProcessor, dino, "--dino")

    def check(self, prompts, identifier, instance_images) -> None:
        if self.clip is None and instance_images is None:
            raise QPDeployError("--dino scores images against the subject: give --instance-images")

    @torch.no_grad()
    def score(self, images: np.ndarray, prompts: list[str], identifier, instance_images) -> dict:
        out = {}
        if self.clip is not None:
            image = self._features(images, lambda b: self.clip.get_image_features(**self._pixels(self.clip_images, b)))
            texts = [_without_word(p, identifier) for p in prompts]  # CLIP does not know the identifier
            words = self._features(texts, self._text_features)
            out["clip_t"] = (image * words).sum(-1).cpu().numpy().astype(np.float64)
            if instance_images is not None:
                reference = self._features(
                    instance_images, lambda b: self.clip.get_image_features(**self._pixels(self.clip_images, b)))
                out["clip_i"] = (image @ reference.T).mean(1).cpu().numpy().astype(np.float64)
        if self.dino is not None and instance_images is not None:
            cls_token = lambda b: self.dino(**self._pixels(self.dino_images, b)).last_hidden_state[:, 0]  # noqa: E731
            image, reference = self._features(images, cls_token), self._features(instance_images, cls_token)
            out["dino"] = (image @ reference.T).mean(1).cpu().numpy().astype(np.float64)
        return out

    def _text_features(self, texts):
        tokens = self.clip_tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        return self.clip.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)

    @staticmethod
    def _features(items, encode, batch: int = 32) -> torch.Tensor:
        """Unit feature rows of ``items`` encoded ``batch`` at a time (real encoders are large)."""
        return torch.cat([_unit(encode(items[i:i + batch])) for i in range(0, len(items), batch)])

    def _pixels(self, processor, images) -> dict:
        return {"pixel_values": processor(images=list(images), return_tensors="pt").pixel_values.to(self.device)}


def _without_word(prompt: str, word: str | None) -> str:
    """The prompt without the identifier word (CLIP-T scores the prompt's content)."""
    if not word:
        return prompt
    return " ".join(w for w in prompt.split() if w.lower() != word.lower())


def _load(cls, path, flag: str):
    path = Path(path)
    if not (path / "config.json").is_file() and cls.__name__ not in ("AutoTokenizer", "AutoImageProcessor"):
        raise QPDeployError(f"{flag} {path} is not a local transformers model folder (no config.json)")
    try:
        return cls.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QPDeployError(f"cannot load {cls.__name__} from {flag} {path}: {first}") from None


def _unit(x) -> torch.Tensor:
    """Rows scaled to unit length; CLIP's ``get_*_features`` return the projected features
    as a tensor (transformers 4) or as the ``pooler_output`` of a model output (5)."""
    x = x if isinstance(x, torch.Tensor) else x.pooler_output
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# --------------------------------------------------------------------------------------
# The model under test
# --------------------------------------------------------------------------------------

def open_model(deploy=None, base=None, pack=None, device="cpu", pack_strength=1.0):
    """``(pipeline, batch, close, recommended sampling)`` for a deploy dir or a base (+ pack
    at ``pack_strength``).

    Raises:
        QPDeployError: both or neither given, a pack without a base, a strength without a
            pack, or any load error.
    """
    if (deploy is None) == (base is None):
        raise QPDeployError("evaluate needs either a deploy dir or --base (with an optional --pack)")
    if pack is not None and base is None:
        raise QPDeployError("--pack needs --base (a deploy dir already holds its pack)")
    if not is_full_strength(pack_strength) and pack is None:
        raise QPDeployError("--pack-strength needs --base and --pack (a deploy dir holds the strength it was "
                            "exported with: qpdeploy export --pack-strength)")
    if deploy is not None:
        from .exporters.manifest import read_manifest
        from .runtimes.config import RuntimeConfig
        from .runtimes.pipeline import close_pipeline, load_deploy_pipeline

        manifest = read_manifest(deploy, verify_hashes=True)
        pipe = load_deploy_pipeline(manifest, RuntimeConfig(device=device))
        return pipe, manifest.data["batch"], lambda: close_pipeline(pipe), manifest.sampling
    from .base import load_base, load_base_pipeline
    from .models import model_sampling_defaults
    from .pack import apply_pack, at_strength, load_pack, post_training_scales, reset_to_post_training
    from .token import apply_tokens

    loaded = load_base(base)
    scales = None if pack is None else at_strength(load_pack(pack), post_training_scales(loaded), pack_strength)
    if scales is None:
        reset_to_post_training(loaded)
    else:
        apply_pack(loaded, scales)
    loaded.unet.eval()
    pipe = load_base_pipeline(loaded)
    if scales is not None and scales.token:
        apply_tokens(pipe, scales.token, scales.tokens)
    pipe.to(device)
    return pipe, 64, lambda: None, model_sampling_defaults(pipe)


def read_instance_images(folder) -> np.ndarray:
    """The readable images of ``folder`` as uint8 (N, H, W, 3), each resized to the first's size."""
    from .data import readable_images

    images = [image for _, image in readable_images(folder)]
    size = images[0].size
    return np.stack([np.asarray(im.convert("RGB").resize(size)) for im in images])


# --------------------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------------------

def evaluate(out, prompts_file, config: EvaluateConfig, deploy=None, base=None, pack=None, instance_dir=None,
             clip=None, dino=None, device="cpu", force: bool = False, scorer=None) -> tuple[Path, dict]:
    """Evaluate a model into the folder ``out``: ``report.json`` and ``images/`` (every image,
    named by prompt number, image number and prompt). Written atomically; an existing ``out``
    needs ``force`` and must be an earlier evaluation. Metrics: :class:`EncoderScorer` when
    ``clip`` or ``dino`` is given, else :class:`MiniworldScorer` (or any ``scorer``).

    Returns:
        ``(out, report)``.
    """
    from .io import atomic_dir, check_output, write_json
    from .prompts import read_prompt_file

    inputs = [deploy, base, pack, prompts_file, instance_dir, clip, dino]
    check_output(out, force, EVALUATION_ARTIFACT, inputs)
    prompts = read_prompt_file(prompts_file)
    if scorer is None:
        scorer = EncoderScorer(clip, dino, device) if clip is not None or dino is not None else MiniworldScorer()
    with atomic_dir(out, force, EVALUATION_ARTIFACT, inputs) as tmp:
        report = evaluate_model(prompts, config, scorer, deploy, base, pack, instance_dir, tmp / "images", device)
        report = {"format_version": EVALUATION_FORMAT_VERSION, "kind": EVALUATION_KIND,
                  "prompts_file": str(prompts_file), **report}
        write_json(tmp / "report.json", report)
    return Path(out), report


def evaluate_model(prompts: list[str], config: EvaluateConfig, scorer, deploy=None, base=None, pack=None,
                   instance_dir=None, save_images=None, device="cpu") -> dict:
    """Generate and score (see module doc); returns the report's figures."""
    from .miniworld.sampling import generate
    from .miniworld.stats import bootstrap_mean

    start = time.perf_counter()
    instances = read_instance_images(instance_dir) if instance_dir is not None else None
    scorer.check(prompts, config.identifier, instances)
    pipe, batch, close, recommended = open_model(deploy, base, pack, device, config.pack_strength)
    steps, guidance = resolve_sampling({"guidance": scorer.guidance, **recommended}, config.steps, config.guidance)
    wanted = [p for p in prompts for _ in range(config.images_per_prompt)]
    try:
        images = generate(pipe, wanted, seed=config.seed, steps=steps, guidance=guidance, batch_size=batch)
    finally:
        close()
    if save_images is not None:
        _save_images(images, wanted, config.images_per_prompt, Path(save_images))
    scores = scorer.score(images, wanted, config.identifier, instances)
    n = config.images_per_prompt
    per_prompt = {p: {k: float(np.mean(v[i * n:(i + 1) * n])) for k, v in scores.items()}
                  for i, p in enumerate(prompts)}
    metrics = {k: bootstrap_mean([v[i * n:(i + 1) * n] for i in range(len(prompts))]) for k, v in scores.items()}
    return {
        "model": {"deploy": _text(deploy), "base": _text(base), "pack": _text(pack),
                  "pack_strength": None if pack is None else config.pack_strength},
        "metrics_kind": scorer.name,
        "metrics": metrics,
        "per_prompt": per_prompt,
        "images": len(wanted),
        "prompts": len(prompts),
        "instance_images": None if instances is None else len(instances),
        "config": config.to_json(),
        "sampling": {"steps": steps, "guidance": guidance, "seed": config.seed,
                     "images_per_prompt": config.images_per_prompt},
        "identifier": config.identifier,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _text(path) -> str | None:
    return None if path is None else str(path)


def _save_images(images: np.ndarray, prompts: list[str], per_prompt: int, folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        slug = "-".join(prompt.lower().split())[:60]
        Image.fromarray(image).save(folder / f"{i // per_prompt:03d}-{i % per_prompt:02d}-{slug}.png")

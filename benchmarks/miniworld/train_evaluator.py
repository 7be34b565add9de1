"""Train the miniworld evaluator and ship it with its held-out accuracy.

    python -m benchmarks.miniworld.train_evaluator [--steps 3000] [--threads 1] [--out DIR] [--work DIR]

Scenes are rendered fresh for every batch (an endless stream, so nothing to overfit) and
augmented with colour jitter, blur and noise, so the evaluator also reads the slightly soft,
slightly off-colour images a diffusion model makes. Accuracy is then measured on renders from
a seed never used in training, clean and augmented, and written to the report. The loop
checkpoints itself into ``--work`` every 250 steps: rerunning the same command resumes it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from qpdeploy.miniworld.evaluator import HEADS, NO_SUBJECT, Evaluator, EvaluatorConfig, save_evaluator, scene_labels
from qpdeploy.miniworld.subjects import mixed_scenes
from qpdeploy.miniworld.world import BACKGROUNDS, COLOURS, Scene, Smudge, contrasts, random_thing, render_batch

from .common import ASSETS_DIR, Clock, LoopCheckpoint, bind_work, folder_megabytes, setup, update_report

TEST_SEED = 10_000  # renders for the held-out accuracy; training uses seeds below it


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random colour gain/offset, Gaussian blur (half the images) and pixel noise; (B, 3, H, W) in [0, 1]."""
    b = images.shape[0]

    def uniform(*shape, low, high):
        return torch.rand(*shape, generator=generator) * (high - low) + low

    images = images * uniform(b, 3, 1, 1, low=0.94, high=1.06) + uniform(b, 3, 1, 1, low=-0.03, high=0.03)
    sigma = uniform(b, low=0.3, high=1.0)
    blurred = gaussian_blur(images, sigma)
    keep = (torch.rand(b, generator=generator) < 0.5).view(b, 1, 1, 1)
    images = torch.where(keep, images, blurred)
    images = images + torch.randn(images.shape, generator=generator) * uniform(b, 1, 1, 1, low=0.0, high=0.04)
    return images.clamp(0, 1)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image with its own sigma (B,), a separable 5-tap kernel."""
    b, c, h, w = images.shape
    taps = torch.arange(-2, 3, dtype=images.dtype)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(-1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, 5)
    x = images.reshape(1, b * c, h, w)
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), kernel[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)


SMUDGED = 0.1  # share of plain objects smeared with a second colour (imperfect generations)


def batch(rng: np.random.Generator, n: int, config: EvaluatorConfig, second_view: bool = False):
    """n fresh labelled renders: (images (n, 3, H, W) in [0, 1], labels per head, scenes).

    A ``SMUDGED`` share of the plain objects is smeared with a second colour (``Smudge``):
    the diffusion model draws such imperfect objects, and a subject with fine detail (pkd's
    thin bands) must not be what the evaluator calls every object with inner colour
    variation. With ``second_view`` the batch holds 2n images: the n scenes, then each one's
    object again (same shape and look) at another place, size and background."""
    scenes = [smudged(rng, s) if s.colour is not None and rng.random() < SMUDGED else s
              for s in mixed_scenes(rng, n)]
    if second_view:
        scenes = scenes + [other_view(rng, s) for s in scenes]
    images = torch.from_numpy(render_batch(scenes)).permute(0, 3, 1, 2).float() / 255.0
    return images, scene_labels(scenes, config), scenes


def smudged(rng: np.random.Generator, scene: Scene) -> Scene:
    """The scene's plain object smeared with another colour (random direction, 20-60%)."""
    others = [c for c in COLOURS if c != scene.colour]
    look = Smudge(scene.colour, others[int(rng.integers(len(others)))], float(rng.uniform(0, 2 * np.pi)),
                  float(rng.uniform(0.2, 0.6)))
    thing = scene.thing
    return Scene(scene.background, type(thing)(thing.shape, look, thing.x, thing.y, thing.size), scene.subject)


def other_view(rng: np.random.Generator, scene: Scene) -> Scene:
    """The same object (shape and look) at a random place and size on another background it
    stays visible on."""
    colour = scene.colour
    options = [b for b in BACKGROUNDS if colour is None or contrasts(colour, b)]
    background = options[int(rng.integers(len(options)))]
    return Scene(background, random_thing(rng, scene.thing.shape, scene.thing.look), scene.subject)


def identity_keys(scenes: list[Scene]) -> torch.Tensor:
    """(N,) index of each scene's object identity (shape and look) within the batch."""
    ids: dict = {}
    return torch.tensor([ids.setdefault((s.thing.shape, s.thing.look), len(ids)) for s in scenes])


def supervised_contrastive(z: torch.Tensor, keys: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SupCon loss (Khosla et al. 2020) on unit embeddings z (N, D): images of one identity
    attract, all others repel."""
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, -1e9)
    positives = (keys[:, None] == keys[None, :]) & ~self_mask
    log_prob = logits - logits.logsumexp(dim=1, keepdim=True)
    has = positives.any(dim=1)
    return -((log_prob * positives).sum(1)[has] / positives.sum(1)[has]).mean()


def round_trip(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] after the VAE round trip (gate 1's), kept to 3 decimals."""
    from qpdeploy.miniworld.reachability import decoded

    return decoded(vae, images).round_(decimals=3)


def loss_fn(out: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(F.cross_entropy(out[h], labels[h], ignore_index=-100) for h in HEADS)


def generated_prompts(count: int, seed: int, class_share: float = 0.0) -> list:
    """The captions of :func:`generated_pool`: ordinary scenes, and a ``class_share`` of the
    subjects' class prompts (the subject's shape, no identifier, no colour) on their ``dev``
    backgrounds and their own instance background, never a ``test`` background. Those teach
    the instance embedding that the class as the base draws it is not the subject."""
    from qpdeploy.miniworld.prompts import Prompt, describe
    from qpdeploy.miniworld.subjects import PROMPT_TEMPLATES, SUBJECTS
    from qpdeploy.miniworld.world import random_scene, train_combos

    rng = np.random.default_rng(seed)
    classes = sorted({Prompt(s.shape, background=b, template=t)
                      for s in SUBJECTS.values()
                      for b in [s.background] + [p.background for p in s.class_prompts("dev")]
                      for t in PROMPT_TEMPLATES}, key=lambda p: p.text)
    n_class = int(round(class_share * count))
    ordinary = [describe(random_scene(rng, train_combos()), rng, drop_colour=0.5, drop_background=0.0)
                for _ in range(count - n_class)]
    return ordinary + [classes[i] for i in rng.integers(len(classes), size=n_class)]


def generated_pool(pipeline_dir: Path, count: int, seed: int, work: Path | None = None, class_share: float = 0.0):
    """``count`` images the base model draws for :func:`generated_prompts` (no identifier:
    never a subject), and their prompted backgrounds: ``(images (G, 3, H, W) in [0, 1],
    background label indices (G,))``. Cached in ``work`` (safetensors) when given."""
    from safetensors.torch import load_file, save_file

    from qpdeploy.miniworld.sampling import generate

    tag = f"-class{class_share:g}" if class_share else ""
    cache = None if work is None else work / f"generated-{count}-{seed}{tag}.safetensors"
    if cache is not None and cache.is_file():
        tensors = load_file(str(cache))
        return tensors["images"].float() / 255.0, tensors["background"]
    from diffusers import DiffusionPipeline

    prompts = generated_prompts(count, seed, class_share)
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True, safety_checker=None)
    images = torch.from_numpy(generate(pipe, prompts, seed=seed)).permute(0, 3, 1, 2).contiguous()
    labels = EvaluatorConfig().labels["background"]
    background = torch.tensor([labels.index(p.background) for p in prompts])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"images": images, "background": background}, str(cache))
    return images.float() / 255.0, background


def add_generated(images, labels, keys, pool, share: float, generator: torch.Generator, n: int):
    """Put pool images (base-model generations, never a subject) in the first ``share`` of
    the batch's ``n`` first views, and the same image as their second view (a positive pair
    after augmentation): background labelled, shape and colour ignored, no subject."""
    pool_images, pool_background = pool
    m = int(round(share * n))
    if m == 0:
        return
    pick = torch.randint(len(pool_images), (m,), generator=generator)
    fresh = keys.max() + 1 + torch.arange(m)  # one new identity per generated image, both views
    for rows in ([slice(0, m)] + ([slice(n, n + m)] if len(images) == 2 * n else [])):
        images[rows] = pool_images[pick]
        labels["background"][rows] = pool_background[pick]
        labels["shape"][rows] = -100
        labels["colour"][rows] = -100
        labels["subject"][rows] = EvaluatorConfig().labels["subject"].index(NO_SUBJECT)
        keys[rows] = fresh


def train(steps: int, batch_size: int, lr: float, seed: int, vae=None, trip: float = 0.5, instance_dim: int = 0,
          contrastive: float = 1.0, checkpoint: LoopCheckpoint | None = None, device: str = "cpu",
          generated=None, generated_share: float = 0.0) -> Evaluator:
    """AdamW with warmup and cosine decay on a stream of fresh augmented renders.

    Args:
        vae: when given, a random ``trip`` fraction of the images is replaced by its round
            trip through this VAE, so the evaluator reads decoded images as well as crisp ones.
        instance_dim: > 0 adds the instance embedding, trained with a supervised contrastive
            loss (weight ``contrastive``) on two views of every object.
        checkpoint: saves the loop on its schedule and resumes from its latest save.
        device: where the evaluator trains; images are rendered, round-tripped and augmented
            on the CPU (the same stream on every device). Returns the model on the CPU.
        generated / generated_share: a :func:`generated_pool` and the share of every batch
            taken from it (the base model's own imperfect objects as non-subjects).
    """
    config = EvaluatorConfig(instance_dim=instance_dim)
    model = Evaluator(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    rng, generator, clock = np.random.default_rng(seed), torch.Generator().manual_seed(seed), Clock()
    checkpoint = checkpoint or LoopCheckpoint(None)
    first = checkpoint.load({"evaluator": model}, optimizer, schedule, rng, generator) + 1
    for step in range(first, steps + 1):
        images, labels, scenes = batch(rng, batch_size, config, second_view=bool(instance_dim))
        if vae is not None:
            pick = torch.rand(len(images), generator=generator) < trip
            images[pick] = round_trip(vae, images[pick])
        keys = identity_keys(scenes)
        if generated is not None:
            add_generated(images, labels, keys, generated, generated_share, generator, batch_size)
        out = model(augment(images, generator).to(device))
        loss = loss_fn(out, {k: v.to(device) for k, v in labels.items()})
        if instance_dim:
            loss = loss + contrastive * supervised_contrastive(out["instance"], keys.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            clock.log(step, steps, loss=loss.item())
        if checkpoint.due(step, steps):
            checkpoint.save(step, {"evaluator": model}, optimizer, schedule, rng, generator)
    return model.cpu().eval()


@torch.no_grad()
def held_out_accuracy(model: Evaluator, n: int = 2000, augmented: bool = False, vae=None) -> dict[str, float]:
    """Accuracy of each head on ``n`` renders from ``TEST_SEED`` (colour: plain objects only),
    plus the subject head's recall on subjects and false-positive rate on everything else;
    with ``vae``, on the renders' round trips through it."""
    images, labels, _ = batch(np.random.default_rng(TEST_SEED), n, model.config)
    if vae is not None:
        images = round_trip(vae, images)
    if augmented:
        images = augment(images, torch.Generator().manual_seed(TEST_SEED))
    out = model(images)
    result = {}
    for head in HEADS:
        known = labels[head] != -100
        result[head] = float((out[head].argmax(-1)[known] == labels[head][known]).float().mean())
    is_subject = labels["subject"] > 0
    said_subject = out["subject"].argmax(-1) > 0
    result["subject_recall"] = float((out["subject"].argmax(-1) == labels["subject"])[is_subject].float().mean())
    result["subject_false_positive_rate"] = float(said_subject[~is_subject].float().mean())
    result["images"] = n
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="miniworld assets folder (evaluator/ goes inside)")
    parser.add_argument("--vae", type=Path, default=None, help="a VAE folder whose round trips are trained on (v2)")
    parser.add_argument("--trip", type=float, default=0.5, help="fraction of images replaced by their round trip")
    parser.add_argument("--instance-dim", type=int, default=0, help="> 0: train an instance embedding (v2)")
    parser.add_argument("--generated", type=Path, default=None,
                        help="a base pipeline whose generations of ordinary captions join training as non-subjects")
    parser.add_argument("--generated-count", type=int, default=2048)
    parser.add_argument("--generated-share", type=float, default=0.15, help="share of each batch from them")
    parser.add_argument("--generated-class-share", type=float, default=0.0,
                        help="share of the generations drawn for the subjects' class prompts (dev and instance "
                             "backgrounds only)")
    parser.add_argument("--work", type=Path, default=Path("runs/miniworld-evaluator"),
                        help="loop checkpoints: rerun the same command to resume")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where training runs (default: the GPU when there is one)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    setup(args.threads, args.seed)
    clock = Clock()
    vae = None
    if args.vae is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae, local_files_only=True).eval().requires_grad_(False)
    bind_work(args.work, {k: v for k, v in vars(args).items() if k not in ("out", "work", "threads", "device")})
    generated = None
    if args.generated is not None:
        generated = generated_pool(args.generated, args.generated_count, args.seed + 7, args.work,
                                   args.generated_class_share)
    model = train(args.steps, args.batch_size, args.lr, args.seed, vae, args.trip, args.instance_dim,
                  checkpoint=LoopCheckpoint(args.work / "evaluator-loop", every=250), device=args.device,
                  generated=generated, generated_share=args.generated_share if generated is not None else 0.0)
    folder = save_evaluator(model, args.out / "evaluator")
    report = {
        "held_out_accuracy": held_out_accuracy(model),
        "held_out_accuracy_augmented": held_out_accuracy(model, augmented=True),
        **({"held_out_accuracy_round_trip": held_out_accuracy(model, vae=vae)} if vae is not None else {}),
        "parameters": sum(p.numel() for p in model.parameters()),
        "megabytes": round(folder_megabytes(folder), 3),
        "train": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                  "vae": None if args.vae is None else str(args.vae), "trip": args.trip,
                  "instance_dim": args.instance_dim,
                  "generated": None if args.generated is None else {
                      "pipeline": str(args.generated), "count": args.generated_count, "share": args.generated_share,
                      "class_share": args.generated_class_share},
                  "threads": args.threads, "device": args.device, "wall_seconds": round(clock.seconds(), 1),
                  "cpu_seconds": round(clock.cpu_seconds(), 1)},
        "command": " ".join(["python -m benchmarks.miniworld.train_evaluator", *argv]),
    }
    path = update_report(args.out, "evaluator", report)
    print(f"evaluator -> {folder}; report -> {path}")
    print(report["held_out_accuracy"])


if __name__ == "__main__":
    main()

"""``qpdeploy demo``: the whole flow on the bundled miniworld model, in a few minutes on a CPU.

Stages, each a real run of the stage's own code path:

1. quantize the bundled model (W8A8, Q-Diffusion calibration, K intervals);
2. write a subject's instance images (PNG, as a user's photos would be);
3. personalize with S2 (one scale set per interval);
4. export two deploy dirs, post-training only and personalized (ONNX with Q/DQ);
5. generate the training prompt and the subject's test prompts (new backgrounds) from both
   with ONNX Runtime;
6. measure subject fidelity (on the training prompt and on the test prompts) and prompt
   fidelity (test prompts) with the bundled evaluator, write ``grid.png`` (one row per
   prompt: post-training images, then personalized ones) and ``report.json``.

The output directory is assembled in a temporary sibling and renamed into place at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean

from .config import ConfigBase, TrainConfig, check_all
from .strategies import get_strategy
from .errors import QPDeployError
from .io import atomic_dir, write_json

DEMO_KIND = "qpdeploy.demo"
DEMO_ARTIFACT = ("report.json", DEMO_KIND)  # header file and kind: what --force may replace
GRID_SCALE = 3  # 32x32 images are drawn 96x96 in the grid


@dataclass(frozen=True)
class DemoConfig(ConfigBase):
    """Settings of a demo run (all recorded in its report).

    Attributes:
        subject: identifier of a bundled subject ("sks", "zwx", "qlv", "pkd").
        intervals: K timestep intervals (S2 trains one scale set per interval).
        steps: training steps; lr: learning rate of the scales.
        seeds: images per prompt (seeds 0..n-1) for each model.
        sample_steps, guidance: DDIM sampling of the generated images.
        threads: ONNX Runtime threads (0: all cores).
    """

    subject: str = "sks"
    intervals: int = get_strategy("s2").default_intervals
    steps: int = TrainConfig.steps
    lr: float = TrainConfig.lr
    seeds: int = 2
    sample_steps: int = 25
    guidance: float = 4.0
    threads: int = 0
    seed: int = 0

    def __post_init__(self):
        from .miniworld.subjects import SUBJECTS

        check_all([
            (self.subject in SUBJECTS, f"unknown subject {self.subject!r}; expected one of {', '.join(SUBJECTS)}"),
            *((getattr(self, name) >= 1, f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
              for name in ("intervals", "steps", "seeds", "sample_steps")),
            (self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (self.guidance >= 0, f"guidance must be >= 0, got {self.guidance}"),
            (self.threads >= 0 and self.seed >= 0, "threads and seed must be >= 0"),
        ])


def run_demo(out, config: DemoConfig = DemoConfig(), force: bool = False, show_progress: bool | str = False) -> tuple[Path, dict]:
    """Run every stage of the module docstring into ``out``; returns ``(out, report)``."""
    from .miniworld.evaluator import EVALUATOR_DIR
    from .models import MINIWORLD_DIR

    for what, path in (("model", MINIWORLD_DIR / "model_index.json"), ("evaluator", EVALUATOR_DIR / "model.safetensors")):
        if not path.is_file():
            raise QPDeployError(f"the bundled miniworld {what} is not installed (expected {path.parent})")
    seconds = {}
    with atomic_dir(out, force, DEMO_ARTIFACT) as tmp:
        clock = time.perf_counter()

        def lap(name):
            nonlocal clock
            now = time.perf_counter()
            seconds[name] = round(now - clock, 2)
            clock = now

        base_dir, pack_dir = _quantize_and_train(tmp, config, show_progress, lap)
        deploys = _export(tmp, base_dir, pack_dir, show_progress, lap)
        images = _generate(tmp, deploys, config, show_progress, lap)
        report = _evaluate(tmp, images, config, base_dir, pack_dir)
        lap("evaluate")
        report["seconds"] = {**seconds, "total": round(sum(seconds.values()), 2)}
        write_json(tmp / "report.json", report)
    return Path(out), report


def _quantize_and_train(tmp: Path, config: DemoConfig, show_progress: bool | str, lap):
    from .config import QuantizeConfig
    from .miniworld.subjects import get_subject, write_instance_images
    from .ptq import quantize_model
    from .train import train

    quantize_model("miniworld", tmp / "base", QuantizeConfig(intervals=config.intervals, seed=config.seed),
                   device="cpu", show_progress=show_progress)
    lap("quantize")
    subject = get_subject(config.subject)
    write_instance_images(subject.identifier, tmp / "instance")
    train_config = TrainConfig(prompt=subject.instance_prompt().text, identifier=subject.identifier, strategy="s2",
                               intervals=config.intervals, steps=config.steps, lr=config.lr, seed=config.seed, guidance=config.guidance)
    train(tmp / "base", tmp / "instance", tmp / "pack", train_config, run_dir=tmp / "pack.run", device="cpu",
          show_progress=show_progress)
    lap("train")
    return tmp / "base", tmp / "pack"


def _export(tmp: Path, base_dir: Path, pack_dir: Path, show_progress: bool | str, lap) -> dict[str, Path]:
    from .exporters.config import ExportConfig
    from .exporters.export import export_from_paths

    deploys = {"post-training": tmp / "deploy-ptq", "personalized": tmp / "deploy"}
    export_from_paths(base_dir, None, deploys["post-training"], ExportConfig(), show_progress=show_progress)
    export_from_paths(base_dir, pack_dir, deploys["personalized"], ExportConfig(), show_progress=show_progress)
    lap("export")
    return deploys


def _generate(tmp: Path, deploys: dict[str, Path], config: DemoConfig, show_progress: bool | str, lap) -> dict:
    import numpy as np
    from PIL import Image

    from .miniworld.subjects import get_subject
    from .progress import stage
    from .runtimes.config import GenerateConfig, RuntimeConfig
    from .runtimes.generate import generate

    subject = get_subject(config.subject)
    # the training prompt first (the subject as photographed), then new backgrounds
    prompts = [subject.instance_prompt().text, *(p.text for p in subject.prompts("test") if p.template == 0)]
    gen = GenerateConfig(steps=config.sample_steps, guidance=config.guidance, seed=config.seed,
                         images_per_prompt=config.seeds, scheduler="ddim")
    runtime = RuntimeConfig(backend="ort", device="cpu", threads=config.threads)
    images = {}
    for name, deploy in deploys.items():
        folder = tmp / "images" / name
        with stage(f"generate ({name})", len(prompts) * config.seeds, show_progress) as advance:
            records = generate(deploy, prompts, gen, runtime, out_dir=folder, progress=advance)
        images[name] = {
            "records": records,
            "pixels": np.stack([np.asarray(Image.open(folder / r["image"]).convert("RGB")) for r in records]),
        }
    lap("generate")
    return {"prompts": prompts, **images}


def _evaluate(tmp: Path, images: dict, config: DemoConfig, base_dir: Path, pack_dir: Path) -> dict:
    from .io import read_json
    from .miniworld.evaluator import load_evaluator
    from .miniworld.metrics import attribute_accuracy, subject_fidelity
    from .miniworld.subjects import get_subject

    subject = get_subject(config.subject)
    by_text = {p.text: p for p in (subject.instance_prompt(), *subject.prompts("test"))}
    prompts = [by_text[t] for t in images["prompts"] for _ in range(config.seeds)]
    evaluator = load_evaluator()
    models = {}
    for name in ("post-training", "personalized"):
        pixels, n = images[name]["pixels"], config.seeds  # the first n images: the training prompt
        models[name] = {
            "subject_fidelity_training_prompt": subject_fidelity(evaluator, pixels[:n], subject.identifier),
            "subject_fidelity": subject_fidelity(evaluator, pixels[n:], subject.identifier),
            "prompt_fidelity": attribute_accuracy(evaluator, pixels[n:], prompts[n:]),
            "seconds_per_step": fmean(r["seconds_per_step"] for r in images[name]["records"]),
        }
    write_grid(tmp / "grid.png", images, config.seeds)
    train_report = read_json(pack_dir / "report.json")
    return {
        "kind": DEMO_KIND,
        "config": config.to_json(),
        "subject": {"identifier": subject.identifier, "class": subject.shape, "description": subject.description},
        "prompts": images["prompts"],
        "models": models,
        "train": {k: train_report[k] for k in ("strategy", "trainable_params", "pack_bytes", "steps", "initial_loss",
                                               "final_loss", "peak_memory_bytes")},
        "base_sqnr_db": read_json(base_dir / "report.json").get("sqnr_db"),
        "files": {"grid": "grid.png", "instance_images": "instance/", "deploy": "deploy/", "images": "images/"},
    }


def write_grid(path: Path, images: dict, seeds: int) -> None:
    """One row per prompt: its post-training images, a gap, its personalized images; the
    prompt is written under each row and the column groups are named on top."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=13)  # Pillow's bundled FreeType font: real word spacing
    cell = 32 * GRID_SCALE
    gap, header, caption = 12, 20, 18
    cols = 2 * seeds
    width = cols * cell + gap
    height = header + len(images["prompts"]) * (cell + caption)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 3), "post-training", fill="black", font=font)
    draw.text((seeds * cell + gap + 4, 3), "personalized (S2)", fill="black", font=font)
    for row, prompt in enumerate(images["prompts"]):
        top = header + row * (cell + caption)
        for group, name in enumerate(("post-training", "personalized")):
            for s in range(seeds):
                pixels = images[name]["pixels"][row * seeds + s]
                tile = Image.fromarray(pixels).resize((cell, cell), Image.NEAREST)
                grid.paste(tile, (group * (seeds * cell + gap) + s * cell, top))
        draw.text((4, top + cell + 2), prompt, fill="black", font=font)
    grid.save(path)

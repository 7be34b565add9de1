"""Scale training: strategies touch exactly what they should, the optimizer never moves an
untrained set, the loss falls, resuming is bit-identical, checkpointing changes nothing."""

import pytest
import torch
from safetensors.torch import load_file

from qpdeploy.config import TrainConfig
from qpdeploy.errors import QPDeployError
from qpdeploy.intervals import Intervals
from qpdeploy.layers import quant_layers
from qpdeploy.optim import ScaleSetOptimizer
from qpdeploy.train import ScaleTrainer, TimestepSampler, prepare_data, train

from .conftest import write_images

PROMPT = "a photo of sks dog"
pytestmark = pytest.mark.filterwarnings("ignore:.*instance image.*:UserWarning")


@pytest.fixture
def make_trainer(cheap_base, tiny_pipe, instance_dir):
    """``make_trainer(family="sd1", **train_config)`` -> ScaleTrainer on a fresh cheap base."""

    def make(family="sd1", **changes):
        base = cheap_base(family)
        config = TrainConfig(PROMPT, **changes)
        examples, scheduler, _, _, _ = prepare_data(base, instance_dir, config, pipe=tiny_pipe(family))
        return ScaleTrainer(base, examples, config, scheduler)

    return make


def snapshot(unet):
    """Every tensor of the UNet; the scale tables as the layers compute them (while training,
    their parameters are the parametrization's per-set vectors)."""
    tensors = {k: v.detach().clone() for k, v in unet.state_dict().items() if ".parametrizations." not in k}
    for name, layer in quant_layers(unet):
        for table in ("s_out", "s_in"):
            if getattr(layer, table) is not None:
                tensors[f"{name}.{table}"] = getattr(layer, table).detach().clone()
    return tensors


def force_intervals(trainer, chosen):
    """Make the trainer draw its timesteps only from the intervals ``chosen``."""
    trainer.sampler = TimestepSampler(trainer.intervals, "s1", chosen, seed=1)


# ------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    (dict(strategy="s3"), "strategy must be one of"),
    (dict(strategy="s1"), "needs the intervals it trains"),
    (dict(strategy="s2", s1_intervals=(0,)), "only used by strategy s1"),
    (dict(strategy="s1", s1_intervals=(4,), intervals=4), r"must be in 0\.\.3"),
    (dict(intervals=4, boundaries=(0, 500, 1000)), "not both"),
    (dict(steps=0), "steps must be in 1..10000000, got 0"),
    (dict(batch_size=65), "batch size must be in 1..64, got 65"),
    (dict(resolution=100_000), "resolution must be a multiple of 8 in 8..8192"),
    (dict(lr=0.0), "learning rate must be positive"),
    (dict(resolution=30), "multiple of 8"),
    (dict(prior_images=10), "needs a class prompt"),
    (dict(class_prompt="a dog"), "needs a number of class images"),
    (dict(validate_every=5), "validation needs a prompt"),
    (dict(precision="fp8"), "precision must be one of"),
    (dict(crop="left"), "crop must be center or random"),
])
def test_config_refuses_bad_settings(changes, message):
    with pytest.raises(QPDeployError, match=message):
        TrainConfig(PROMPT, **changes)


def test_config_round_trips_through_json():
    config = TrainConfig(PROMPT, strategy="s1", s1_intervals=(0, 2), boundaries=(0, 200, 600, 1000), lr=3e-3)
    assert TrainConfig.from_json(config.to_json()) == config
    assert config.make_intervals(Intervals.uniform(4)).boundaries == (0, 200, 600, 1000)
    assert config.batch_for(3) == 4 and TrainConfig(PROMPT).batch_for(3) == 6 and TrainConfig(PROMPT).batch_for(2) == 4


# ------------------------------------------------------------------------------------
# Timestep sampling
# ------------------------------------------------------------------------------------

def test_s2_gives_every_interval_an_equal_share_in_mixed_batches():
    iv = Intervals.parse("0,100,400,900,1000")  # unequal lengths: the share is still equal
    sampler = TimestepSampler(iv, "s2", seed=0)
    g = torch.Generator().manual_seed(0)
    batches = [sampler.draw(step * 4, 4, g) for step in range(25)]
    for t in batches:  # B = K: every batch holds every interval once
        assert sorted(iv.index(t).tolist()) == [0, 1, 2, 3]
    odd = torch.cat([sampler.draw(step * 3, 3, g) for step in range(20)])  # B = 3: balanced over the run
    assert torch.bincount(iv.index(odd), minlength=4).tolist() == [15, 15, 15, 15]
    assert torch.equal(sampler.draw(8, 4, torch.Generator().manual_seed(5)),
                       sampler.draw(8, 4, torch.Generator().manual_seed(5)))


def test_s1_draws_only_its_intervals_and_baseline_draws_all():
    iv = Intervals.uniform(4)
    g = torch.Generator().manual_seed(0)
    s1 = TimestepSampler(iv, "s1", (0, 2)).draw(0, 2000, g)
    counts = torch.bincount(iv.index(s1), minlength=4).tolist()
    assert counts[1] == counts[3] == 0 and min(counts[0], counts[2]) > 900
    base = TimestepSampler(iv, "baseline").draw(0, 4000, g)
    assert base.min() >= 0 and base.max() < 1000 and min(torch.bincount(iv.index(base)).tolist()) > 900


# ------------------------------------------------------------------------------------
# Which parameters each strategy changes
# ------------------------------------------------------------------------------------

def test_s2_batch_from_interval_2_changes_only_expert_2_and_nothing_else(make_trainer):
    trainer = make_trainer(strategy="s2", intervals=4, batch_size=2, train_input_scales=True, lr=0.01)
    before = snapshot(trainer.unet)
    force_intervals(trainer, (2,))
    trainer.train_step()
    after = snapshot(trainer.unet)
    assert before.keys() == after.keys()
    changed_rows = set()
    for key in before:
        if key.endswith((".s_out", ".s_in")):
            for e in range(4):
                if not torch.equal(before[key][e], after[key][e]):
                    changed_rows.add(e)
            assert not torch.equal(before[key][2], after[key][2]), key  # every layer's expert 2 moved
        else:
            assert torch.equal(before[key], after[key]), key  # weights, biases, act scales: bit for bit
    assert changed_rows == {2}


def test_an_expert_whose_interval_is_never_sampled_stays_exactly_at_its_start(make_trainer):
    # momentum and weight decay are both on: neither may touch expert 2
    trainer = make_trainer(strategy="s2", intervals=4, batch_size=2, lr=0.05, weight_decay=0.5,
                           train_input_scales=True)
    start = snapshot(trainer.unet)
    force_intervals(trainer, (0, 1, 3))
    for _ in range(6):
        trainer.train_step()
    for name, layer in quant_layers(trainer.unet):
        assert torch.equal(layer.s_out[2], start[f"{name}.s_out"][2])
        assert torch.equal(layer.s_out[2], layer.s_ptq)
        assert torch.equal(layer.s_in[2], torch.ones_like(layer.s_in[2]))
        assert not torch.equal(layer.s_out[0], start[f"{name}.s_out"][0])
    state = trainer.optimizer.optimizer.state
    assert not any(p in state for p in trainer.optimizer.parameters(2))
    assert all(p in state for p in trainer.optimizer.parameters(0))


def test_adamw_on_a_shared_scale_table_would_move_an_untrained_row():
    # The flaw the per-set layout avoids: a row with zero gradient still moves.
    table = torch.nn.Parameter(torch.ones(3, 8))
    opt = torch.optim.AdamW([table], lr=0.1, weight_decay=0.5)
    table.grad = torch.zeros(3, 8)
    table.grad[0] = 1.0
    opt.step()
    assert not torch.equal(table[2].detach(), torch.ones(8))  # weight decay on an untrained row
    table.grad = torch.zeros(3, 8)
    table.grad[1] = 1.0
    row0 = table[0].detach().clone()
    opt.step()
    assert not torch.equal(table[0].detach(), row0)  # momentum on a row without gradient this step


def test_s1_gets_zero_gradient_outside_its_intervals(make_trainer):
    trainer = make_trainer(strategy="s1", s1_intervals=(0, 1), intervals=4, batch_size=2, train_input_scales=True)
    batch = trainer.make_batch(0)
    batch.timesteps = torch.tensor([600, 900])  # intervals 2 and 3: post-training scales
    trainer.loss(batch).backward()
    params = trainer.optimizer.parameters(0)  # S1 has one set: every layer's s_out and s_in part
    assert len(params) == 2 * len(trainer.optimizer.layers) and all(not p.grad.any() for p in params)
    trainer.optimizer.zero_grad()
    batch.timesteps = torch.tensor([10, 400])  # intervals 0 and 1: the trained set
    trainer.loss(batch).backward()
    assert all(p.grad.any() for p in params)
    trainer.optimizer.zero_grad()
    before = snapshot(trainer.unet)
    force_intervals(trainer, (2, 3))
    trainer.train_step()
    after = snapshot(trainer.unet)
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_baseline_trains_its_single_set_at_every_timestep(make_trainer):
    trainer = make_trainer(strategy="baseline", intervals=4, lr=0.01)
    start = snapshot(trainer.unet)
    force_intervals(trainer, (3,))
    trainer.train_step()
    moved = [not torch.equal(layer.s_out[0], start[f"{name}.s_out"][0]) for name, layer in quant_layers(trainer.unet)]
    assert all(moved) and trainer.optimizer.num_sets == 1


def test_loss_goes_down_when_overfitting_two_images(cheap_base, tiny_pipe, tmp_path):
    base = cheap_base("sd1")
    config = TrainConfig(PROMPT, strategy="baseline", batch_size=2, lr=0.05, steps=20)
    examples, scheduler, _, _, _ = prepare_data(base, write_images(tmp_path / "two", count=2, size=(16, 16)), config,
                                             pipe=tiny_pipe("sd1"))
    trainer = ScaleTrainer(base, examples, config, scheduler)
    held = [trainer.make_batch(10_000 + u) for u in range(6)]  # fixed latents, noise and timesteps

    def loss():
        with torch.no_grad():
            return float(sum(trainer.loss(b) for b in held) / len(held))

    before = loss()
    for _ in range(20):
        trainer.train_step()
    assert loss() < 0.9 * before


def masked_images(folder):
    """Three random images whose masks mark their left half as the subject."""
    import numpy as np
    from PIL import Image

    write_images(folder, count=3, size=(24, 20))
    (folder / "masks").mkdir()
    mask = np.zeros((20, 24), np.uint8)
    mask[:, :12] = 255
    for i in range(3):
        Image.fromarray(mask).save(folder / "masks" / f"{i:02d}.png")
    return folder


def test_background_weight_weighs_each_latent_pixel_by_its_subject_share(cheap_base, tiny_pipe, tmp_path):
    base = cheap_base("sd1")
    config = TrainConfig(PROMPT, strategy="baseline", background_weight=0.25)
    examples, scheduler, _, _, _ = prepare_data(base, masked_images(tmp_path / "m"), config, pipe=tiny_pipe("sd1"))
    share = examples.subject_mask  # (3, 1, h, w)
    assert share.shape == (3, 1, *examples.latent_mean.shape[-2:])
    assert (share == 0).any() and (share == 1).any() and 0.3 < float(share.mean()) < 0.7
    trainer = ScaleTrainer(base, examples, config, scheduler)
    batch = trainer.make_batch(0)
    squared = torch.rand(len(batch.example), *examples.latent_mean.shape[1:], requires_grad=True)
    trainer._pixel_mean(squared, batch).sum().backward()
    weight = 0.25 + 0.75 * share[batch.example]  # what each latent pixel should count for
    per_weight = squared.grad / weight  # constant within each sample when the loss is that weighted mean
    assert torch.allclose(per_weight, per_weight.amax(dim=(1, 2, 3), keepdim=True), rtol=1e-5)
    assert torch.allclose(squared.grad.sum(dim=(1, 2, 3)), torch.ones(len(batch.example)))  # still a mean
    background = (share[batch.example] == 0).expand_as(squared)
    subject = (share[batch.example] == 1).expand_as(squared)
    assert float(squared.grad[background].mean() / squared.grad[subject].mean()) == pytest.approx(0.25, rel=1e-5)

    trainer.config = TrainConfig(PROMPT, strategy="baseline")  # weight 1: DreamBooth's plain mean, bit for bit
    assert torch.equal(trainer._pixel_mean(squared, batch), squared.mean(dim=(1, 2, 3)))


@pytest.mark.slow  # 3 s: two short runs on fresh bases; the weighting itself is the fast test above
def test_background_weight_changes_what_is_learned_and_is_recorded(cheap_base, tiny_pipe, tmp_path):
    folder = masked_images(tmp_path / "m")
    packs = {}
    for weight in (1.0, 0.0):
        base = cheap_base("sd1")
        config = TrainConfig(PROMPT, strategy="baseline", lr=0.05, steps=2, background_weight=weight)
        examples, scheduler, _, _, _ = prepare_data(base, folder, config, pipe=tiny_pipe("sd1"))
        assert (examples.subject_mask is None) == (weight == 1.0)  # masks are read only when used
        trainer = ScaleTrainer(base, examples, config, scheduler)
        for _ in range(2):
            trainer.train_step()
        packs[weight] = trainer.pack()
    assert packs[0.0].meta["train"]["background_weight"] == 0.0
    assert packs[1.0].meta["train"]["background_weight"] == 1.0
    differ = [not torch.equal(packs[0.0].scales[k], packs[1.0].scales[k]) for k in packs[1.0].scales]
    assert sum(differ) > len(differ) // 2


def test_gradient_checkpointing_gives_bit_identical_gradients(make_trainer):
    grads = []
    for checkpointing in (False, True):
        trainer = make_trainer(strategy="s2", batch_size=4, train_input_scales=True,
                               gradient_checkpointing=checkpointing)
        trainer.loss(trainer.make_batch(0)).backward()
        optimizer = trainer.optimizer
        grads.append(torch.cat([p.grad.flatten() for e in range(optimizer.num_sets) for p in optimizer.parameters(e)]))
        assert trainer.unet.is_gradient_checkpointing == checkpointing
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])


def test_optimizer_state_round_trips_exactly(make_trainer):
    trainer = make_trainer(strategy="s2", batch_size=3, lr=0.02)
    for _ in range(2):
        trainer.train_step()
    tensors, hyper = trainer.optimizer.state_tensors(), trainer.optimizer.hyperparameters()
    other = ScaleSetOptimizer(trainer.unet, lr=1.0)
    other.load_state(tensors, hyper)
    assert other.optimizer.state_dict()["param_groups"] == trainer.optimizer.optimizer.state_dict()["param_groups"]
    again = other.state_tensors()
    assert tensors.keys() == again.keys() and all(torch.equal(tensors[k], again[k]) for k in tensors)


# ------------------------------------------------------------------------------------
# Whole runs: artifacts, resume, prior preservation, validation, SDXL
# ------------------------------------------------------------------------------------

def run(cheap_base, tiny_pipe, images, out, family="sd1", base=None, **kwargs):
    config_keys = {k: kwargs.pop(k) for k in list(kwargs) if k in TrainConfig.__dataclass_fields__}
    config = TrainConfig(PROMPT, **config_keys)
    return train(base or cheap_base(family), images, out, config, pipe=tiny_pipe(family), device="cpu", **kwargs)


@pytest.mark.slow  # 4 s; the full suite runs it
def test_a_run_stopped_and_resumed_ends_bit_identical(cheap_base, tiny_pipe, instance_dir, tmp_path):
    # S2 with B < K (experts skip steps), accumulation, input scales, decay, random crops
    settings = dict(strategy="s2", intervals=4, batch_size=1, grad_accum=2, train_input_scales=True, lr=0.02,
                    weight_decay=0.1, crop="random", crops_per_image=2, checkpoint_every=2)
    whole, whole_report = run(cheap_base, tiny_pipe, instance_dir, tmp_path / "whole", steps=4, **settings)
    first, _ = run(cheap_base, tiny_pipe, instance_dir, tmp_path / "first", steps=2, **settings)
    assert (tmp_path / "first.run" / "checkpoints" / "step-000002" / "state.safetensors").is_file()
    resumed, resumed_report = run(cheap_base, tiny_pipe, instance_dir, tmp_path / "resumed", steps=4,
                                  resume=tmp_path / "first.run", **settings)
    a, b = load_file(str(whole / "scales.safetensors")), load_file(str(resumed / "scales.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed_report["resumed_from_step"] == 2 and resumed_report["steps"] == 4
    for key in ("final_loss", "initial_loss", "samples_per_interval"):
        assert resumed_report[key] == whole_report[key]
    # and the scales did train: not all sets equal to the first run's three steps
    c = load_file(str(first / "scales.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resume_refuses_other_settings_and_other_bases(cheap_base, tiny_pipe, instance_dir, tmp_path):
    run(cheap_base, tiny_pipe, instance_dir, tmp_path / "p", steps=2, checkpoint_every=2, strategy="baseline", lr=1e-3)
    with pytest.raises(QPDeployError, match="trained with lr=0.001, this run has 0.5"):
        run(cheap_base, tiny_pipe, instance_dir, tmp_path / "q", steps=4, lr=0.5, strategy="baseline",
            resume=tmp_path / "p.run")
    # a run checkpointed with the old fixed sampling (25 steps, guidance 7.5) resumes when given them again
    run(cheap_base, tiny_pipe, instance_dir, tmp_path / "old", steps=2, checkpoint_every=2, strategy="baseline",
        sample_steps=25, guidance=7.5)
    with pytest.raises(QPDeployError, match="trained with sample_steps=25, this run has None"):
        run(cheap_base, tiny_pipe, instance_dir, tmp_path / "new", steps=3, strategy="baseline",
            resume=tmp_path / "old.run")
    _, report = run(cheap_base, tiny_pipe, instance_dir, tmp_path / "new", steps=3, strategy="baseline",
                    sample_steps=25, guidance=7.5, resume=tmp_path / "old.run")
    assert report["resumed_from_step"] == 2 and report["steps"] == 3
    other = cheap_base("sd1", weight_bits=4)
    with pytest.raises(QPDeployError, match="was trained on base"):
        run(cheap_base, tiny_pipe, instance_dir, tmp_path / "q", base=other, steps=4, strategy="baseline",
            resume=tmp_path / "p.run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QPDeployError, match="no training checkpoint"):
        run(cheap_base, tiny_pipe, instance_dir, tmp_path / "q", steps=4, resume=tmp_path / "empty")
    with pytest.raises(QPDeployError, match="lies inside the input"):  # the output inside a folder read
        run(cheap_base, tiny_pipe, instance_dir, tmp_path / "q", steps=4, resume=tmp_path)


def test_report_holds_the_issue_keys_with_true_numbers(cheap_base, tiny_pipe, instance_dir, tmp_path):
    path, report = run(cheap_base, tiny_pipe, instance_dir, tmp_path / "pack", strategy="s2", intervals=2,
                       steps=3, train_input_scales=True)
    for key in ("strategy", "trainable_params", "pack_bytes", "steps", "final_loss", "seconds", "peak_memory_bytes"):
        assert key in report
    base = cheap_base("sd1")
    per_set = sum(layer.out_features + layer.in_features for _, layer in quant_layers(base.unet))
    assert report["trainable_params"] == 2 * per_set
    assert report["pack_bytes"] == sum(p.stat().st_size for p in path.iterdir() if p.name != "report.json")
    assert report["steps"] == 3 and report["samples_per_interval"] == [6, 6]  # B = 4 (2 per interval), 3 steps
    assert report["peak_memory_bytes"] > 0 and report["final_loss"] > 0
    assert sorted(p.name for p in path.iterdir()) == ["pack.json", "report.json", "scales.safetensors"]


def test_an_existing_output_is_refused_before_any_work(cheap_base, tiny_pipe, instance_dir, tmp_path):
    (tmp_path / "pack").mkdir()
    with pytest.raises(QPDeployError, match="already exists"):
        run(cheap_base, tiny_pipe, instance_dir, tmp_path / "pack", steps=1)


def test_prompt_without_identifier_warns_and_trains(cheap_base, tiny_pipe, instance_dir, tmp_path):
    config = TrainConfig("a photo of a dog", strategy="baseline", steps=1)
    with pytest.warns(UserWarning, match="identifier"):
        path, report = train(cheap_base("sd1"), instance_dir, tmp_path / "p", config, pipe=tiny_pipe("sd1"))
    assert report["steps"] == 1 and (path / "scales.safetensors").is_file()


def test_sdxl_trains_with_precomputed_added_conditions(cheap_base, tiny_pipe, tmp_path):
    images = write_images(tmp_path / "xl", count=3, size=(24, 16))
    base = cheap_base("sdxl")
    config = TrainConfig(PROMPT, strategy="s2", intervals=2, steps=2, lr=0.01, validate_every=2,
                         validation_prompt="a sks dog on the beach", validation_images=1, sample_steps=2)
    examples, scheduler, validator, _, _ = prepare_data(base, images, config, pipe=tiny_pipe("sdxl"))
    # (original H, W, crop top, left, target H, W): 24x16 -> 24x16 resized to 24 x 16, cropped at left 4
    assert examples.time_ids.tolist() == [[16.0, 24.0, 0.0, 4.0, 16.0, 16.0]] * 3
    assert examples.pooled_embeds.shape == (1, 32) and examples.prompt_embeds.shape[-1] == 64
    trainer = ScaleTrainer(base, examples, config, scheduler)
    start = snapshot(trainer.unet)
    losses = [trainer.train_step() for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(start[k], v) for k, v in snapshot(trainer.unet).items() if k.endswith(".s_out"))
    from PIL import Image

    assert Image.open(validator(trainer.unet, tmp_path / "v.png")).size == (16, 16)  # SDXL validation, no encoders
    assert trainer.unet.training


def test_prior_preservation_and_validation_grid(cheap_base, tiny_pipe, instance_dir, tmp_path):
    path, report = run(cheap_base, tiny_pipe, instance_dir, tmp_path / "pack", strategy="baseline", steps=2,
                       class_prompt="a photo of a dog", prior_images=3, prior_weight=0.5, sample_steps=2,
                       validate_every=2, validation_prompt="a sks dog on the beach", validation_images=2,
                       class_dir=tmp_path / "classes")
    assert report["class_images"] == 3 and report["instance_images"] == 3
    from PIL import Image

    grid = Image.open(tmp_path / "pack.run" / "validation" / "step-000002.png")
    assert grid.size == (2 * 16, 16)
    cached = sorted(p.name for p in (tmp_path / "classes").rglob("*.png"))
    assert cached == ["00000.png", "00001.png", "00002.png"]


def test_encoders_are_released_before_the_loop(cheap_saved_base, instance_dir):
    import gc

    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from qpdeploy.base import load_base

    def alive():
        gc.collect()
        objects = gc.get_objects()
        return (sum(isinstance(o, CLIPTextModel) for o in objects), sum(isinstance(o, AutoencoderKL) for o in objects))

    base = load_base(cheap_saved_base("sd1"))
    before = alive()
    examples, _, validator, _, _ = prepare_data(base, instance_dir, TrainConfig(PROMPT, steps=1))  # loads the source
    assert validator is None and examples.latent_mean.shape == (3, 4, 8, 8)
    assert alive() == before  # text encoder and VAE gone
    config = TrainConfig(PROMPT, validate_every=1, validation_prompt="a sks dog")
    _, _, validator, _, _ = prepare_data(base, instance_dir, config)
    assert alive() == (before[0], before[1] + 1)  # validating keeps the VAE only
    assert validator.pipe.text_encoder is None


def test_a_checkpoint_written_before_a_config_field_existed_still_resumes(cheap_base, tiny_pipe, instance_dir,
                                                                          tmp_path):
    import json

    from qpdeploy.checkpoint import STATE_FILE

    run(cheap_base, tiny_pipe, instance_dir, tmp_path / "old", steps=2, checkpoint_every=2, strategy="baseline")
    state_file = tmp_path / "old.run" / "checkpoints" / "step-000002" / STATE_FILE
    state = json.loads(state_file.read_text())
    del state["train"]["validation_images"]  # as an older qpdeploy, which had no such field, wrote it
    state_file.write_text(json.dumps(state))
    _, report = run(cheap_base, tiny_pipe, instance_dir, tmp_path / "new", steps=3, strategy="baseline",
                    resume=tmp_path / "old.run")
    assert report["resumed_from_step"] == 2 and report["steps"] == 3


def test_the_scale_sets_are_the_unets_trainable_parameters_and_release_bakes_them(make_trainer):
    from torch.nn.utils import parametrize

    trainer = make_trainer(strategy="s2", intervals=4, batch_size=2, train_input_scales=True, lr=0.05)
    optimizer = trainer.optimizer
    trainable = [p for p in trainer.unet.parameters() if p.requires_grad]
    sets = [p for e in range(optimizer.num_sets) for p in optimizer.parameters(e)]
    assert len(trainable) == len(sets) == 2 * 4 * len(optimizer.layers)
    assert {id(p) for p in trainable} == {id(p) for p in sets}  # what an outside clipper or optimizer would see
    trainer.loss(trainer.make_batch(0)).backward()
    norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm=1e-6)  # a clip acts on the gradients that step
    assert norm > 1e-6 and torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in sets])) < 1.01e-6
    optimizer.zero_grad()
    for _ in range(2):
        trainer.train_step()
    layer = optimizer.layers[0]
    moved = layer.s_out.detach().clone()
    assert not torch.equal(moved, layer.s_ptq.expand_as(moved))
    trainer.finish()
    assert not parametrize.is_parametrized(layer) and isinstance(layer.s_out, torch.nn.Parameter)
    assert torch.equal(layer.s_out, moved) and not layer.s_out.requires_grad
    assert not any(p.requires_grad for p in trainer.unet.parameters())


# ------------------------------------------------------------------------------------
# keep_scales: some layers' scales stay at post-training
# ------------------------------------------------------------------------------------

KV = r"attn2\.to_[kv]$"


def test_kept_layers_stay_bit_exact_at_post_training_and_the_rest_trains(cheap_base, tiny_pipe, instance_dir,
                                                                         tmp_path):
    from qpdeploy.pack import load_pack

    path, report = run(cheap_base, tiny_pipe, instance_dir, tmp_path / "pack", strategy="s2", intervals=2, steps=3,
                       lr=0.05, weight_decay=0.1, train_input_scales=True, keep_scales=(KV,))
    base = cheap_base("sd1")
    layers = dict(quant_layers(base.unet))
    kept = [n for n in layers if n.endswith(("attn2.to_k", "attn2.to_v"))]
    assert len(kept) >= 2
    pack = load_pack(path)
    for name, layer in layers.items():
        s_out, s_in = pack.scales[f"{name}.s_out"], pack.scales[f"{name}.s_in"]
        assert s_out.shape == (2, layer.out_features)
        if name in kept:  # both sets, both tables, exactly where training started
            assert torch.equal(s_out, layer.s_ptq.detach().expand(2, -1))
            assert torch.equal(s_in, torch.ones(2, layer.in_features))
        else:
            assert not torch.equal(s_out[0], layer.s_ptq.detach()), name
    per_set = sum(layer.out_features + layer.in_features for n, layer in layers.items() if n not in kept)
    assert report["trainable_params"] == 2 * per_set
    assert pack.meta["train"]["keep_scales"] == [KV]


def test_keep_scales_refuses_a_bad_pattern_one_that_matches_nothing_and_one_that_matches_all(
        cheap_base, tiny_pipe, instance_dir, tmp_path):
    with pytest.raises(QPDeployError, match=r"keep-scales pattern '\(' is not a valid regular expression"):
        TrainConfig(PROMPT, keep_scales=("(",))
    for pattern, message in (("no_such_layer", "keep-scales pattern 'no_such_layer' matches no quantized layer"),
                             (".", "matches every quantized layer")):
        with pytest.raises(QPDeployError, match=message):
            run(cheap_base, tiny_pipe, instance_dir, tmp_path / "pack", steps=1, keep_scales=(pattern,))
        assert not (tmp_path / "pack").exists()  # nothing half-written


def test_cli_train_passes_keep_scales(cheap_saved_base, instance_dir, tmp_path):
    from typer.testing import CliRunner

    from qpdeploy.cli import app
    from qpdeploy.pack import load_pack

    out = tmp_path / "pack"
    result = CliRunner().invoke(app, ["train", "--base", str(cheap_saved_base("sd1")), "--images", str(instance_dir),
                                      "--prompt", PROMPT, "--steps", "1", "--keep-scales", KV,
                                      "--keep-scales", r"attn1\.to_q$", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert load_pack(out).meta["train"]["keep_scales"] == [KV, r"attn1\.to_q$"]


# ------------------------------------------------------------------------------------
# scale_lr: some layers' scales train at another learning rate
# ------------------------------------------------------------------------------------

def test_a_layer_rate_scales_how_far_its_scales_move_and_leaves_the_rest_bit_identical(
        cheap_base, tiny_pipe, instance_dir, tmp_path):
    # AdamW's first step moves a value by lr * g / (|g| + eps) = lr * f (f = |g| / (|g| + eps),
    # read off the plain run); at rate 1/4 the layer's gradient is g / 4, its own step
    # lr * g / (|g| + 4 eps) = lr * f / (f + 4 (1 - f)), and its scales move a quarter of that.
    # The other layers, whose forward and gradients are the same, end bit for bit where they did
    from qpdeploy.pack import load_pack

    options = dict(strategy="s2", intervals=2, steps=1, lr=0.05, train_input_scales=True)
    plain = load_pack(run(cheap_base, tiny_pipe, instance_dir, tmp_path / "plain", **options)[0])
    rated = load_pack(run(cheap_base, tiny_pipe, instance_dir, tmp_path / "rated", scale_lr=(f"{KV}=0.25",),
                          **options)[0])
    layers = dict(quant_layers(cheap_base("sd1").unet))
    slow = [n for n in layers if n.endswith(("attn2.to_k", "attn2.to_v"))]
    assert len(slow) >= 2
    for name, layer in layers.items():
        for table, reference in (("s_out", layer.s_ptq.detach()), ("s_in", torch.ones(layer.in_features))):
            a, b = plain.scales[f"{name}.{table}"], rated.scales[f"{name}.{table}"]
            if name in slow:
                moved, rated_moved = a / reference - 1, b / reference - 1
                assert (moved.abs() > 0.049).float().mean() > 0.5, name  # most moved a full lr
                f = moved.abs() / 0.05
                torch.testing.assert_close(rated_moved, 0.25 * moved / (f + 4 * (1 - f)), rtol=1e-3, atol=1e-6)
            else:
                assert torch.equal(a, b), name
    assert rated.meta["train"]["scale_lr"] == [f"{KV}=0.25"]


@pytest.mark.parametrize("entry, message", [
    ("attn2", r"scale-lr 'attn2' is not REGEX=FACTOR with a factor > 0"),
    ("attn2=0", r"with a factor > 0 \(to freeze layers, use keep-scales\)"),
    ("attn2=-1", "is not REGEX=FACTOR"),
    ("attn2=fast", "is not REGEX=FACTOR"),
    ("=0.5", "is not REGEX=FACTOR"),
    ("(=0.5", r"scale-lr pattern '\(' is not a valid regular expression"),
])
def test_scale_lr_refuses_a_malformed_entry_in_one_line(entry, message):
    with pytest.raises(QPDeployError, match=message) as error:
        TrainConfig(PROMPT, scale_lr=(entry,))
    assert "\n" not in str(error.value)


def test_scale_lr_refuses_a_pattern_that_matches_no_trained_layer_before_writing(cheap_base, tiny_pipe, instance_dir,
                                                                                  tmp_path):
    for options in (dict(scale_lr=("no_such_layer=2",)), dict(keep_scales=(KV,), scale_lr=(f"{KV}=2",))):
        with pytest.raises(QPDeployError, match="matches no trained quantized layer"):
            run(cheap_base, tiny_pipe, instance_dir, tmp_path / "pack", steps=1, **options)
        assert not (tmp_path / "pack").exists()


def test_cli_train_passes_scale_lr(cheap_saved_base, instance_dir, tmp_path):
    from typer.testing import CliRunner

    from qpdeploy.cli import app
    from qpdeploy.pack import load_pack

    out = tmp_path / "pack"
    result = CliRunner().invoke(app, ["train", "--base", str(cheap_saved_base("sd1")), "--images", str(instance_dir),
                                      "--prompt", PROMPT, "--steps", "1", "--scale-lr", f"{KV}=0.3",
                                      "--scale-lr", r"attn1\.to_q$=2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert load_pack(out).meta["train"]["scale_lr"] == [f"{KV}=0.3", r"attn1\.to_q$=2"]


def test_class_and_validation_images_follow_the_models_recommended_sampling(cheap_base, tiny_pipe, instance_dir,
                                                                            tmp_path):
    """Training samples its class and validation images as generate samples the model: the
    model folder's recommended steps and guidance (miniworld: guidance 4, not 7.5) unless given."""
    import json

    from qpdeploy.models import SAMPLING_FILE

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / SAMPLING_FILE).write_text('{"guidance": 2.5, "steps": 3}')

    def sampled(name, **given):
        pipe = tiny_pipe("sd1")
        pipe.register_to_config(_name_or_path=str(folder))
        config = TrainConfig(PROMPT, class_prompt="a photo of a dog", prior_images=1, validate_every=1,
                             validation_prompt="a sks dog", validation_images=1, **given)
        base = cheap_base()
        _, _, validator, _, _ = prepare_data(base, instance_dir, config, pipe=pipe, class_dir=tmp_path / name)
        (cache,) = (tmp_path / name).rglob("cache.json")
        class_sampling = json.loads(cache.read_text())
        validator(base.unet, tmp_path / f"{name}.png")
        return ((class_sampling["steps"], class_sampling["guidance"]),
                (len(validator.pipe.scheduler.timesteps), validator.guidance))

    assert sampled("recommended") == ((3, 2.5), (3, 2.5))
    assert sampled("given", sample_steps=2, guidance=1.5) == ((2, 1.5), (2, 1.5))
    with pytest.raises(QPDeployError, match="guidance must be in 0..100"):
        TrainConfig(PROMPT, guidance=-1)

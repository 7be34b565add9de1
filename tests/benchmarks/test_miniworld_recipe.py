"""The miniworld rebuild recipe resumes after an interruption and ends bit-identical."""

import numpy as np
import pytest
import torch

from benchmarks.miniworld import diffusion
from benchmarks.miniworld.common import LoopCheckpoint
from qpdeploy.miniworld.prompts import build_tokenizer
from qpdeploy.miniworld.world import random_scene


def tiny_run(steps, checkpoint=None):
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    text_encoder = diffusion.build_text_encoder(tokenizer, width=16, layers=1)
    unet = diffusion.build_unet((8, 16, 16), context=16, sample_size=8)
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(16)]
    gen = torch.Generator().manual_seed(1)
    data = diffusion.LatentSet(scenes, torch.randn(16, 4, 8, 8, generator=gen), torch.rand(16, 4, 8, 8, generator=gen))
    return diffusion.train_diffusion(data, tokenizer, text_encoder, unet, 0.5, steps, batch_size=4, lr=1e-3,
                                     seed=3, checkpoint=checkpoint)


class Killed(Exception):
    pass


class KilledAfterFirstSave(LoopCheckpoint):
    def save(self, step, *args):
        super().save(step, *args)
        raise Killed(step)


def test_an_interrupted_diffusion_run_resumes_bit_identical(tmp_path):
    whole_text, whole_unet = tiny_run(4)
    with pytest.raises(Killed):
        tiny_run(4, KilledAfterFirstSave(tmp_path / "ckpt", every=2))  # dies right after its step-2 checkpoint
    text, unet = tiny_run(4, LoopCheckpoint(tmp_path / "ckpt", every=2))  # a fresh start resumes at step 3
    for a, b in ((whole_text, text), (whole_unet, unet)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    first = tiny_run(2)[1].state_dict()
    assert any(not torch.equal(first[k], whole_unet.state_dict()[k]) for k in first)  # the last steps did train


def test_an_interrupted_evaluator_run_resumes_bit_identical(tmp_path):
    from benchmarks.miniworld import train_evaluator

    def run(checkpoint=None):
        torch.manual_seed(0)
        return train_evaluator.train(4, 8, 1e-3, seed=5, instance_dim=8, checkpoint=checkpoint).state_dict()

    whole = run()
    with pytest.raises(Killed):
        run(KilledAfterFirstSave(tmp_path / "ckpt", every=2))
    resumed = run(LoopCheckpoint(tmp_path / "ckpt", every=2))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_textured_pretraining_shows_decoys_in_the_asked_share_and_never_a_subject(monkeypatch):
    import benchmarks.miniworld.vae as vae_stage
    from benchmarks.miniworld.train_base import pretraining_latents
    from qpdeploy.miniworld.subjects import SUBJECTS, UNSEEN_SUBJECTS, _resembles

    # the scene lists are what this test reads: encoding is replaced by zeros
    monkeypatch.setattr(vae_stage, "encode", lambda vae, images: (torch.zeros(len(images), 1),) * 2)
    plain = pretraining_latents(None, 600, seed=1).scenes
    mixed = pretraining_latents(None, 600, seed=1, textured=0.3).scenes
    assert all(s.colour is not None for s in plain)
    decoys = [s for s in mixed if s.colour is None]
    assert 0.24 < len(decoys) / len(mixed) < 0.36
    assert not any(_resembles(s.thing.shape, s.thing.look, subject)
                   for s in decoys for subject in (*SUBJECTS.values(), *UNSEEN_SUBJECTS))


def test_generated_negatives_replace_a_share_of_the_batch_as_positive_pairs_of_no_subject():
    from benchmarks.miniworld import train_evaluator as T
    from qpdeploy.miniworld.evaluator import NO_SUBJECT, EvaluatorConfig

    config = EvaluatorConfig(instance_dim=8)
    images, labels, scenes = T.batch(np.random.default_rng(0), 16, config, second_view=True)
    keys = T.identity_keys(scenes)
    pool = (torch.rand(5, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4]))
    T.add_generated(images, labels, keys, pool, 0.25, torch.Generator().manual_seed(0), 16)
    assert torch.equal(images[:4], images[16:20])  # each generated image is its own positive pair
    assert any(torch.equal(images[0], p) for p in pool[0])
    none = config.labels["subject"].index(NO_SUBJECT)
    assert (labels["subject"][:4] == none).all() and (labels["shape"][:4] == -100).all()
    assert torch.equal(keys[:4], keys[16:20]) and len(set(keys[:4].tolist())) == 4
    assert not set(keys[:4].tolist()) & set(keys[4:16].tolist())  # new identities
    assert not torch.equal(images[4:16], images[20:32])  # the rest of the batch is as it was


def test_generated_class_prompts_never_use_a_test_background_or_an_identifier():
    from benchmarks.miniworld import train_evaluator as T
    from qpdeploy.miniworld.subjects import SUBJECTS

    prompts = T.generated_prompts(400, seed=3, class_share=0.25)
    assert len(prompts) == 400 and all(p.identifier is None for p in prompts)
    tail = prompts[300:]  # the class share comes last
    test_backgrounds = {(s.shape, p.background) for s in SUBJECTS.values() for p in s.class_prompts("test")}
    allowed = {(s.shape, b) for s in SUBJECTS.values()
               for b in [s.background] + [p.background for p in s.class_prompts("dev")]}
    assert all((p.shape, p.background) in allowed and p.colour is None for p in tail)
    assert not {(p.shape, p.background) for p in tail} & (test_backgrounds - allowed)
    assert len({p.shape for p in tail}) == len({s.shape for s in SUBJECTS.values()})
    assert T.generated_prompts(400, seed=3) == T.generated_prompts(400, seed=3, class_share=0.0)

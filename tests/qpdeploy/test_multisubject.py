"""Several subjects trained in one run: each subject's pack is bit for bit the pack of training
it alone, a resumed group run is bit-identical, and the subjects file is checked."""

import pytest
import torch
from safetensors.torch import load_file

from qpdeploy.config import TrainConfig
from qpdeploy.errors import QPDeployError
from qpdeploy.multisubject import SubjectSpec, read_subjects, train_subjects
from qpdeploy.train import train

from .conftest import write_images

pytestmark = [pytest.mark.filterwarnings("ignore:.*instance image.*:UserWarning"),
              pytest.mark.filterwarnings("ignore:.*tokenizer does not know.*:UserWarning")]
# S2 with B < K (sets skip steps), accumulation, input scales, weight decay, random crops
SHARED = dict(strategy="s2", intervals=4, batch_size=1, grad_accum=2, train_input_scales=True, lr=0.02,
              weight_decay=0.1, crop="random", crops_per_image=2)


@pytest.fixture
def specs(tmp_path):
    return [SubjectSpec("sks", write_images(tmp_path / "dog", count=3, seed=1), "a photo of sks dog"),
            SubjectSpec("zwx", write_images(tmp_path / "cat", count=2, seed=2), "a photo of zwx cat",
                        "a photo of a cat")]


def scales(path):
    return load_file(str(path / "scales.safetensors"))


@pytest.mark.slow
def test_each_subjects_pack_is_its_pack_trained_alone(cheap_base, tiny_pipe, specs, tmp_path):
    config = TrainConfig("unused", steps=3, **SHARED)
    out, reports = train_subjects(cheap_base("sd1"), specs, tmp_path / "packs", config, prior_images=2,
                                  pipe=tiny_pipe("sd1"), class_dir=tmp_path / "class", device="cpu")
    assert sorted(p.name for p in out.iterdir()) == ["sks", "zwx"]
    for spec in specs:
        alone, report = train(cheap_base("sd1"), spec.images, tmp_path / f"alone-{spec.identifier}",
                              spec.config(config, 2), pipe=tiny_pipe("sd1"), class_dir=tmp_path / "class", device="cpu")
        a, b = scales(alone), scales(out / spec.identifier)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), spec.identifier
        assert reports[spec.identifier]["final_loss"] == report["final_loss"]
        assert reports[spec.identifier]["samples_per_interval"] == report["samples_per_interval"]
        assert reports[spec.identifier]["trainable_params"] == report["trainable_params"]
    assert reports["zwx"]["class_images"] == 2 and reports["sks"]["class_images"] == 0  # sks has no class prompt
    # the two subjects learned different scales
    assert any(not torch.equal(v, scales(out / "zwx")[k]) for k, v in scales(out / "sks").items())


@pytest.mark.slow
def test_a_group_run_stopped_and_resumed_ends_bit_identical(cheap_base, tiny_pipe, specs, tmp_path):
    def run(out, steps, resume=None):
        config = TrainConfig("unused", steps=steps, checkpoint_every=2, **SHARED)
        return train_subjects(cheap_base("sd1"), specs, out, config, pipe=tiny_pipe("sd1"), device="cpu",
                              resume=resume)

    whole, _ = run(tmp_path / "whole", 4)
    run(tmp_path / "first", 2)
    resumed, reports = run(tmp_path / "resumed", 4, resume=tmp_path / "first.run")
    assert reports["sks"]["resumed_from_step"] == 2
    for identifier in ("sks", "zwx"):
        a, b = scales(whole / identifier), scales(resumed / identifier)
        assert all(torch.equal(a[k], b[k]) for k in a)
    other = [SubjectSpec("sks", specs[0].images, "a photo of sks puppy"), specs[1]]
    with pytest.raises(QPDeployError, match="trained with prompt='a photo of sks dog'"):
        train_subjects(cheap_base("sd1"), other, tmp_path / "other", TrainConfig("unused", steps=4, **SHARED),
                       pipe=tiny_pipe("sd1"), device="cpu", resume=tmp_path / "first.run")


def test_the_subjects_file_is_read_and_checked(tmp_path):
    write_images(tmp_path / "photos" / "dog")
    good = tmp_path / "subjects.toml"
    good.write_text('[[subject]]\nidentifier = "sks"\nimages = "photos/dog"\nprompt = "a photo of sks dog"\n'
                    'class_prompt = "a photo of a dog"\n')
    [spec] = read_subjects(good)
    assert spec.images == tmp_path / "photos" / "dog" and spec.class_prompt == "a photo of a dog"
    cases = {
        "[[subject]]\nidentifier = 'sks'\nprompt = 'a sks dog'\n": "missing images",
        "[[subject]]\nidentifier = 'sks'\nimages = 'x'\nprompt = 'p'\ncolour = 'red'\n": "unknown key colour",
        "[[subject]]\nidentifier = 'sks'\nimages = 'x'\nprompt = 'p'\n[[subject]]\nidentifier = 'sks'\n"
        "images = 'y'\nprompt = 'q'\n": "names subject 'sks' twice",
        "title = 'none'\n": "lists no",
        "[[subject]\n": "cannot read subjects file",
    }
    for text, message in cases.items():
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(QPDeployError, match=message):
            read_subjects(bad)


def test_train_subjects_from_the_command_line(cheap_saved_base, tmp_path):
    from typer.testing import CliRunner

    from qpdeploy.cli import app

    write_images(tmp_path / "dog", seed=1)
    write_images(tmp_path / "cat", seed=2)
    (tmp_path / "subjects.toml").write_text(
        '[[subject]]\nidentifier = "sks"\nimages = "dog"\nprompt = "a photo of sks dog"\n'
        '[[subject]]\nidentifier = "zwx"\nimages = "cat"\nprompt = "a photo of zwx cat"\n')
    args = ["train", "--base", str(cheap_saved_base()), "--subjects", str(tmp_path / "subjects.toml"),
            "--out", str(tmp_path / "packs"), "--steps", "2", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "packs" / "sks" / "pack.json").is_file() and (tmp_path / "packs" / "zwx" / "pack.json").is_file()
    again = CliRunner().invoke(app, args)  # the packs exist now: refused without --force
    assert again.exit_code == 2 and "already exists" in again.output
    mixed = CliRunner().invoke(app, [*args, "--images", str(tmp_path / "dog"), "--force"])
    assert mixed.exit_code == 2 and "--subjects trains over an existing --base" in mixed.output
    masked = CliRunner().invoke(app, [*args[:5], "--out", str(tmp_path / "masked"), "--background-weight", "0.5"])
    assert masked.exit_code == 2 and "no subject mask for 00.png: expected" in masked.output  # each subject's masks/
    assert not (tmp_path / "masked").exists()

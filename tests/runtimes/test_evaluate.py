"""``qpdeploy evaluate``: CLIP-T / CLIP-I / DINO on tiny random encoders built from configs, the
miniworld metrics on real renders, a deploy dir through the CLI, and its bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from qpdeploy.cli import app
from qpdeploy.errors import QPDeployError
from qpdeploy.evaluate import EncoderScorer

pytestmark = pytest.mark.filterwarnings("ignore:.*instance image.*:UserWarning")


@pytest.fixture(scope="session")
def encoders(tmp_path_factory):
    """Folders of a tiny random CLIP (with the tiny pipeline's tokenizer) and DINOv2, as
    transformers saves them: what --clip and --dino read."""
    from transformers import BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, Dinov2Config, Dinov2Model

    from qpdeploy.models import tiny_pipeline

    root = tmp_path_factory.mktemp("encoders")
    tokenizer = tiny_pipeline("sd1").tokenizer
    torch.manual_seed(0)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=2)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2)).save_pretrained(root / "dino")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(root / "dino")
    return root


def random_images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_encoder_metrics_are_the_dreambooth_papers(encoders):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    scorer = EncoderScorer(encoders / "clip", encoders / "dino")
    images, instances = random_images(3), random_images(2, seed=1)
    images[0] = instances[0]
    prompts = ["a photo of sks dog", "a dog", "a photo of a dog"]
    scores = scorer.score(images, prompts, "sks", instances)
    assert set(scores) == {"clip_t", "clip_i", "dino"} and all(v.shape == (3,) for v in scores.values())
    # by hand: CLIP cosine of each image to its prompt, and mean cosine to the instance images
    model = CLIPModel.from_pretrained(encoders / "clip").eval()
    without_identifier = ["a photo of dog", "a dog", "a photo of a dog"]  # CLIP-T leaves the identifier out
    tokens = AutoTokenizer.from_pretrained(encoders / "clip")(without_identifier, padding=True, return_tensors="pt")
    pixels = AutoImageProcessor.from_pretrained(encoders / "clip")(images=list(images), return_tensors="pt")
    with torch.no_grad():
        i = model.get_image_features(**pixels).pooler_output
        t = model.get_text_features(**tokens).pooler_output
    expected = torch.nn.functional.cosine_similarity(i, t).numpy()
    np.testing.assert_allclose(scores["clip_t"], expected, atol=1e-5)
    assert np.array_equal(scorer.score(images, prompts, None, instances)["clip_t"][1:], scores["clip_t"][1:])
    assert not np.allclose(scorer.score(images, prompts, None, instances)["clip_t"][0], scores["clip_t"][0])
    # batching (32 at a time) changes nothing
    many = np.concatenate([images] * 12)  # 36 images: two batches
    np.testing.assert_allclose(scorer.score(many, prompts * 12, "sks", instances)["clip_t"], np.tile(scores["clip_t"], 12),
                               atol=1e-5)
    # an image identical to one of two instances: its cosine to that one is 1
    self_clip = scorer.score(instances, prompts[:2], "sks", instances[:1])
    assert self_clip["clip_i"][0] == pytest.approx(1.0, abs=1e-5) and self_clip["dino"][0] == pytest.approx(1.0, abs=1e-5)
    assert self_clip["clip_i"][1] < 0.9999 and self_clip["dino"][1] < 0.9999


def test_encoder_inputs_are_checked(encoders, tmp_path):
    with pytest.raises(QPDeployError, match="need --clip PATH and/or --dino PATH"):
        EncoderScorer()
    with pytest.raises(QPDeployError, match=r"--clip .*missing is not a local transformers model folder"):
        EncoderScorer(tmp_path / "missing")
    dino_only = EncoderScorer(dino=encoders / "dino")
    with pytest.raises(QPDeployError, match="--dino scores images against the subject: give --instance-images"):
        dino_only.check(["a dog"], "sks", None)


def invoke(*args):
    return CliRunner().invoke(app, ["evaluate", *map(str, args)])


@pytest.mark.slow
def test_evaluate_a_deploy_dir_from_the_cli(deploy, encoders, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks dog\n# a comment\n\na sks dog\n")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, image in enumerate(random_images(3, seed=5)):
        Image.fromarray(image).save(photos / f"{i}.png")
    out = tmp_path / "eval"
    args = [deploy("sd1_s2"), "--prompts", prompts, "--out", out, "--clip", encoders / "clip", "--dino",
            encoders / "dino", "--instance-images", photos, "--identifier", "sks", "--images-per-prompt", 2,
            "--steps", 3]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "qpdeploy.evaluation" and report["metrics_kind"] == "encoders"
    assert report["images"] == 4 and report["prompts"] == 2 and report["instance_images"] == 3
    assert report["sampling"] == {"steps": 3, "guidance": 7.5, "seed": 0, "images_per_prompt": 2}
    for name in ("clip_t", "clip_i", "dino"):
        stat = report["metrics"][name]
        assert stat["n"] == 4 and stat["low"] <= stat["mean"] <= stat["high"]
        per_prompt = [report["per_prompt"][p][name] for p in ("a photo of sks dog", "a sks dog")]
        assert stat["mean"] == pytest.approx(np.mean(per_prompt))
    assert len(list((out / "images").glob("*.png"))) == 4
    assert "clip_t" in result.output and "report:" in result.output
    # again: refused without --force, and --force replaces only an evaluation
    again = invoke(*args)
    assert again.exit_code == 2 and "already exists (use --force" in again.output
    refused = invoke(*args[:3], "--out", photos, *args[5:], "--force")
    assert refused.exit_code == 2 and "is the input" in refused.output
    assert len(list(photos.iterdir())) == 3  # the photos are untouched
    assert invoke(*args, "--force").exit_code == 0


def test_evaluate_needs_one_model(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    result = invoke("--prompts", prompts, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "needs either a deploy dir or --base" in result.output
    assert not (tmp_path / "o").exists()


def test_a_pack_strength_needs_a_pack(deploy, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    for strength in ("0.5", "1/0.5"):
        result = invoke(deploy("sd1_s2"), "--prompts", prompts, "--out", tmp_path / "o", "--pack-strength", strength)
        assert result.exit_code == 2 and "--pack-strength needs --base and --pack" in result.output
    assert not (tmp_path / "o").exists()

"""The fidelity benchmark's own rows: the QLoRA-style row (peft LoRA around qpdeploy's quantized
linears) and the text-side levers (the text encoder trains with the scales)."""

import contextlib
from unittest import mock

import pytest
import torch

import qpdeploy.train
from benchmarks.fidelity import GUIDANCE, TEXT_ROWS, TextSideTuner, add_lora, parse_row, row_problem, split_guidance
from qpdeploy.config import TrainConfig
from qpdeploy.data import encode_prompts, prompt_embeddings
from qpdeploy.layers import QuantLinear, quant_layers
from qpdeploy.pack import load_pack
from qpdeploy.token import PREFIX, TokenTuner, identifier_token_ids
from qpdeploy.train import train

from ..qpdeploy.conftest import write_images

PROMPT = "a photo of sks dog"


def _call(unet):
    g = torch.Generator().manual_seed(0)
    return unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 5, 32, generator=g)).sample


@pytest.mark.slow
def test_lora_on_the_w8a8_base_trains_adapters_only_and_keeps_integer_weights(tiny_base):
    base = tiny_base("sd1", fresh=True, calib_steps=2, calib_samples=4)  # quality does not matter here
    unet = base.unet.eval().requires_grad_(False)
    before = _call(unet).detach()
    w_int = [layer.w_int.clone() for _, layer in quant_layers(unet)]
    add_lora(unet)
    wrapped = [m for name, m in unet.named_modules() if name.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    assert wrapped and all(isinstance(m.base_layer, QuantLinear) for m in wrapped)
    assert torch.equal(_call(unet), before)  # B starts at zero: the base's own output
    params = [p for p in unet.parameters() if p.requires_grad]
    assert len(params) == 2 * len(wrapped) and all("lora_" in n for n, p in unet.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    _call(unet).pow(2).mean().backward()
    optimizer.step()
    assert not torch.equal(_call(unet), before)  # the adapters moved the output
    layers = [layer for _, layer in quant_layers(unet)]
    assert len(layers) == len(w_int)
    for layer, before_int in zip(layers, w_int):
        assert layer.w_int.dtype == torch.int8 and torch.equal(layer.w_int, before_int)


def _encoder_state(pipe):
    return {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}


@pytest.mark.parametrize("kind", ["scales", "encoder"])
def test_a_text_side_tuner_trains_what_it_says_and_restores_the_encoder_bit_identical(tiny_pipe, kind):
    pipe = tiny_pipe("sd1")
    state, before = _encoder_state(pipe), encode_prompts(pipe, [PROMPT, "a cat"], "cpu")[0]
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    tuner = TextSideTuner(pipe, "sks", kind, lr=1e-2)
    linears = [m for m in pipe.text_encoder.modules() if isinstance(m, torch.nn.Linear)]
    if kind == "scales":  # one multiplier per output channel of every linear layer, starting at 1
        assert tuner.size == sum(m.out_features for m in linears) > 0
        assert not any(p.requires_grad for p in pipe.text_encoder.parameters())
    else:
        assert tuner.size == sum(p.numel() for p in pipe.text_encoder.parameters())
    assert torch.equal(prompt_embeddings(pipe, [PROMPT, "a cat"], "cpu")[0], before)  # nothing moved yet
    embeds = prompt_embeddings(pipe, [PROMPT], "cpu")[0]
    embeds.pow(2).mean().backward()
    tuner.step()
    tuner.release()
    after = encode_prompts(pipe, [PROMPT, "a cat"], "cpu")[0]
    assert float((after - before).abs().max()) > 1e-4  # every prompt is encoded by the trained encoder
    row = tuner.tensors()[PREFIX + "text_encoder"]
    moved = not torch.equal(row, table[identifier_token_ids(pipe, "sks")["text_encoder"]])
    assert moved == (kind == "encoder")  # the identifier row trains only with the whole encoder
    flags = [p.requires_grad for p in pipe.text_encoder.parameters()]
    tuner.restore()
    assert all(torch.equal(v, state[k]) for k, v in pipe.text_encoder.state_dict().items())
    assert [p.requires_grad for p in pipe.text_encoder.parameters()] == [True] * len(flags) != flags  # as it was
    assert torch.equal(encode_prompts(pipe, [PROMPT, "a cat"], "cpu")[0], before)  # multipliers gone


@pytest.mark.slow
def test_scale_training_takes_a_text_side_tuner_in_the_identifier_row_slot(tiny_base, tiny_pipe, tmp_path):
    """What the ``+text_*`` rows run: qpdeploy's trainer, with the tuner in pivotal tuning's slot."""
    images = write_images(tmp_path / "images")
    pipe = tiny_pipe("sd1")
    base = tiny_base("sd1", fresh=True, calib_steps=2, calib_samples=4)
    before = encode_prompts(pipe, [PROMPT], "cpu")[0]
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    tuners = []

    def make(*args, **kwargs):  # what the trainer calls for its identifier-row tuner
        tuners.append(TextSideTuner(pipe, "sks", "scales", 1e-2))
        return tuners[-1]

    with mock.patch.object(qpdeploy.train, "TokenTuner", make):
        path, report = train(base, images, tmp_path / "pack", TrainConfig(PROMPT, steps=3, train_token=True),
                             pipe=pipe, device="cpu")
    assert qpdeploy.train.TokenTuner is TokenTuner  # put back
    assert len(tuners) == 1 and report["token_params"] == tuners[0].size
    assert float((encode_prompts(pipe, [PROMPT], "cpu")[0] - before).abs().max()) > 1e-5  # trained with the scales
    pack = load_pack(path)
    assert report["trainable_params"] == sum(v.numel() for v in pack.scales.values()) + tuners[0].size
    assert torch.equal(pack.tokens[PREFIX + "text_encoder"],
                       table[pack.token["ids"]["text_encoder"]])
    tuners[0].restore()
    assert torch.equal(encode_prompts(pipe, [PROMPT], "cpu")[0], before)
    assert set(TEXT_ROWS.values()) == {"encoder", "scales"}


def test_a_row_at_a_pack_strength_is_a_scale_row_with_fixed_intervals_and_a_strength_in_range():
    rows = ("s2_k2+in", "s2_k2+in@0.5", "s1_low+in@0", "baseline@2", "s2_k2+in@1/0.5")
    assert [row_problem(r) for r in rows] == [None] * 5
    assert row_problem("nope@0.5") == "unknown row 'nope'"
    assert "no pack strength" in row_problem("s1+in@0.5")  # S1 picks its intervals per run
    assert "no pack strength" in row_problem("fp_lora@0.5")
    assert "no pack strength" in row_problem("s2_k2+in+text_encoder@0.5")
    assert row_problem("s2_k2+in@half") == \
        "row s2_k2+in@half: pack strength must be a number between 0 and 2, got 'half'"
    assert row_problem("s2_k2+in@2.5") == "row s2_k2+in@2.5: pack strength must be a number between 0 and 2, got 2.5"


def test_a_row_with_a_background_weight_is_a_scale_row_with_fixed_intervals_and_a_weight_in_range():
    assert [parse_row(r) for r in ("s2_k2+in+bg0.3", "s2_k2+in+token+bg0@1/0.5", "s2_k2+in")] == \
        [("s2_k2+in", 0.3, ""), ("s2_k2+in+token", 0.0, "1/0.5"), ("s2_k2+in", 1.0, "")]
    assert row_problem("s2_k2+in+bg0.3@0.9") is None
    assert row_problem("s2_k2+in+bghalf") == \
        "row s2_k2+in+bghalf: the background weight after +bg and the guidance after :g must be numbers"
    assert row_problem("s2_k2+in+bg1.5") == "row s2_k2+in+bg1.5: background weight must be in 0..1, got 1.5"
    assert "no background weight" in row_problem("s1+in+bg0.3")
    assert "no background weight" in row_problem("s2_k2+in+text_encoder+bg0.3")
    assert row_problem("fp_lora+bg0.3") == "unknown row 'fp_lora+bg0.3'"


def test_rows_at_a_strength_measure_the_rows_own_pack_trained_once(saved_base, tiny_pipe, tmp_path):
    import argparse

    from benchmarks import fidelity
    from qpdeploy.base import load_base
    from qpdeploy.layers import quant_layers
    from qpdeploy.miniworld.subjects import SUBJECTS
    from qpdeploy.pack import ScalePack, at_strength, init_scale_sets, post_training_scales, save_pack, scales_of

    base_dir = saved_base("sd1")
    base = load_base(base_dir)
    init_scale_sets(base, "s2", base.intervals, input_scales=True)
    for _, layer in quant_layers(base.unet):
        layer.s_out.data *= 1.5
    pack = ScalePack("s2", base.intervals, base.base_hash, scales_of(base.unet))
    trained = []

    def train_pack(*args):
        trained.append(args)
        report = {"trainable_params": 1, "pack_bytes": 2, "seconds": 3.0, "peak_memory_bytes": 4, "final_loss": 0.5}
        return save_pack(tmp_path / f"pack-{len(trained)}", pack), report

    measured, guidances = {}, []

    def evaluate(pipe, subject, split, seed, guidance):
        measured[len(measured)] = {name: layer.s_out.clone() for name, layer in quant_layers(pipe.unet)}
        guidances.append(guidance)
        return {"subject_recognised": 0.0}

    bench = object.__new__(fidelity.Bench)
    bench.args, bench.workdir, bench.pipe = argparse.Namespace(split="dev", device="cpu"), tmp_path, tiny_pipe("sd1")
    bench.trained, bench.base_dir, bench.train_pack, bench.evaluate = {}, lambda bits: base_dir, train_pack, evaluate
    (tmp_path / "instance-sks").mkdir()
    results = [bench.run_row(row, SUBJECTS["sks"], 0) for row in ("s2_k2+in", "s2_k2+in@0.5", "s2_k2+in@0")]
    assert len(trained) == 1 and all(r["train_seconds"] == 3.0 for r in results)
    ptq = post_training_scales(load_base(base_dir))
    for i, strength in enumerate((1.0, 0.5, 0.0)):
        expected = at_strength(pack, ptq, strength).scales
        assert all(torch.equal(s, expected[f"{name}.s_out"]) for name, s in measured[i].items()), strength
    assert all(torch.equal(s, ptq[name].expand_as(s)) for name, s in measured[2].items())  # 0: the base
    for row in ("s2_k2+in+bg0.3", "s2_k2+in+bg0.3@0.5"):  # another background weight: its own pack, once
        bench.run_row(row, SUBJECTS["sks"], 0)
    assert [args[-2:] for args in trained] == [(1.0, ()), (0.3, ())]  # (background weight, layer options)
    bench.run_row("s2_k2+in+keepkv@0.5", SUBJECTS["sks"], 0)  # kept layers: a pack of its own
    assert trained[-1][-2:] == (1.0, (("keep_scales", fidelity.KV_PATTERNS),))
    bench.run_row("s2_k2+in+kv0.1", SUBJECTS["sks"], 0)  # layer rates: another
    assert trained[-1][-2:] == (1.0, (("scale_lr", tuple(f"{p}=0.1" for p in fidelity.KV_PATTERNS)),))
    guidances.clear()
    bench.run_row("s2_k2+in:g6", SUBJECTS["sks"], 0)  # another guidance: the same pack, sampled at 6
    bench.run_row("s2_k2+in@0.5:g7.5", SUBJECTS["sks"], 0)
    assert len(trained) == 4 and guidances == [6.0, 7.5]  # no new pack for either
    assert all(torch.equal(s, at_strength(pack, ptq, 0.5).scales[f"{n}.s_out"]) for n, s in measured[len(measured) - 1].items())


def test_an_adapter_row_at_another_guidance_reuses_the_adapter_trained_for_its_subject_and_seed(tiny_pipe, tmp_path):
    import argparse
    import copy

    from benchmarks import fidelity
    from qpdeploy.miniworld.subjects import SUBJECTS

    pipe = tiny_pipe("sd1")
    trained, sampled = [], []
    encoder = copy.deepcopy(pipe.text_encoder)  # the one DreamBooth trained: in the pipe while its images are sampled

    def train_adapter(row, subject, images, seed):
        trained.append((row, subject.identifier, seed))
        return pipe.unet, encoder, None, {}, {"train_seconds": 1.0}

    def evaluate(p, subject, split, seed, guidance):
        sampled.append((p.text_encoder is encoder, guidance))
        return {"subject_recognised": 0.0}

    bench = object.__new__(fidelity.Bench)
    bench.args, bench.workdir, bench.pipe, bench.adapters = argparse.Namespace(split="dev"), tmp_path, pipe, {}
    bench._train_adapter, bench.evaluate = train_adapter, evaluate
    original = pipe.text_encoder
    for row, seed in (("fp_dreambooth", 0), ("fp_dreambooth:g6", 0), ("fp_dreambooth:g8", 1)):
        name, guidance = split_guidance(row)
        assert bench.float_row(name, SUBJECTS["sks"], tmp_path, seed, guidance)["train_seconds"] == 1.0
    assert trained == [("fp_dreambooth", "sks", 0), ("fp_dreambooth", "sks", 1)]  # seed 1: trained again
    assert sampled == [(True, GUIDANCE), (True, 6.0), (True, 8.0)] and pipe.text_encoder is original


def test_a_row_at_another_guidance_is_any_row_that_trains_nothing_per_run_beyond_a_pack_or_adapter():
    assert split_guidance("s2_k2+in@0.9:g6") == ("s2_k2+in@0.9", 6.0)
    assert split_guidance("fp_dreambooth") == ("fp_dreambooth", GUIDANCE)
    rows = ("fp:g6", "w8a8_ptq:g8", "fp_dreambooth:g6", "s2_k2+in+bg0.1@0.9:g7.5", "s1_low+in:g5")
    assert [row_problem(r) for r in rows] == [None] * 5
    assert "no guidance variant" in row_problem("s1+in:g6")  # S1 picks its intervals per run
    assert "no guidance variant" in row_problem("s2_k2+in+text_encoder:g6")
    assert row_problem("fp:gx") == "row fp:gx: the background weight after +bg and the guidance after :g must be numbers"
    assert row_problem("fp:g0.5") == "row fp:g0.5: guidance must be in 1..30, got 0.5"
    assert row_problem("nope:g6") == "unknown row 'nope'"


def _perturbed_s2_pack(saved_base):
    """A tiny base and an S2 pack with input scales whose every scale moved off post-training."""
    from qpdeploy.base import load_base
    from qpdeploy.pack import ScalePack, init_scale_sets, scales_of

    base = load_base(saved_base("sd1"))
    init_scale_sets(base, "s2", base.intervals, input_scales=True)
    for _, layer in quant_layers(base.unet):
        layer.s_out.data *= 1.5
        layer.s_in.data += 0.25
    return base, ScalePack("s2", base.intervals, base.base_hash, scales_of(base.unet))


def test_the_kv_probe_puts_exactly_the_cross_attention_keys_and_values_back_on_post_training_scales(saved_base):
    from benchmarks.fidelity import CROSS_KV, without_trained
    from qpdeploy.pack import post_training_scales

    base, pack = _perturbed_s2_pack(saved_base)
    ptq = post_training_scales(base)
    probed = without_trained(pack, ptq, CROSS_KV)
    reset = {name for name in ptq if name.endswith(CROSS_KV)}
    assert reset and len(reset) < len(ptq)
    for name in ptq:
        s_out, s_in = probed.scales[f"{name}.s_out"], probed.scales[f"{name}.s_in"]
        if name in reset:
            assert torch.equal(s_out, ptq[name].expand_as(s_out)) and torch.equal(s_in, torch.ones_like(s_in))
        else:
            assert torch.equal(s_out, pack.scales[f"{name}.s_out"]) and torch.equal(s_in, pack.scales[f"{name}.s_in"])
    assert [row_problem(r) for r in ("s2_k2+in:kvptq", "s2_k2+in@0.9:g6:kvptq")] == [None, None]
    assert "no :kvptq probe" in row_problem("fp_dreambooth:kvptq")


def test_the_kept_kv_row_keeps_exactly_the_layers_the_probe_resets(saved_base):
    from benchmarks.fidelity import CROSS_KV, LAYER_ROWS, SCALE_ROWS
    from qpdeploy.base import load_base
    from qpdeploy.config import TrainConfig
    from qpdeploy.layers import quant_layers

    names = [name for name, _ in quant_layers(load_base(saved_base("sd1")).unet)]
    kv = {n for n in names if n.endswith(CROSS_KV)}
    config = TrainConfig("a photo of sks dog", **LAYER_ROWS["s2_k2+in+keepkv"])
    assert config.kept_layers(names) == kv != set()
    for factor in (0.1, 0.3):  # the rated rows slow exactly the same layers
        assert TrainConfig("a photo of sks dog", **LAYER_ROWS[f"s2_k2+in+kv{factor}"]).layer_rates(names) == \
               dict.fromkeys(kv, factor)
        assert SCALE_ROWS[f"s2_k2+in+kv{factor}"] == SCALE_ROWS["s2_k2+in"]
    assert SCALE_ROWS["s2_k2+in+keepkv"] == SCALE_ROWS["s2_k2+in"]  # the defaults but for the kept layers
    assert [row_problem(r) for r in ("s2_k2+in+keepkv", "s2_k2+in+keepkv@0.9", "s2_k2+in+keepkv:g6")] == [None] * 3


@pytest.mark.slow
def test_the_token_kv_probe_keeps_the_packs_keys_and_values_on_the_identifiers_tokens_only(saved_base, tiny_pipe):
    from benchmarks.fidelity import CROSS_KV, kv_scales_on_identifier_only, without_trained
    from qpdeploy.pack import apply_pack, post_training_scales
    from qpdeploy.validate import quantized_pipeline

    base, pack = _perturbed_s2_pack(saved_base)
    probed = without_trained(pack, post_training_scales(base), CROSS_KV)
    first_kv = next(layer for n, layer in quant_layers(base.unet) if n.endswith(CROSS_KV))
    pipe = quantized_pipeline(tiny_pipe("sd1"), base.unet.eval())
    (token_id,) = identifier_token_ids(pipe, "sks").values()

    def run(scales, prompt, gated=False):
        """Images and the first K/V layer's output in the first UNet call (CFG: negatives first)."""
        apply_pack(base, scales)
        seen = []
        handle = first_kv.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
        try:
            with kv_scales_on_identifier_only(pipe, "sks") if gated else contextlib.nullcontext():
                images = pipe(prompt, num_inference_steps=2, guidance_scale=4.0, output_type="np",
                              generator=torch.Generator().manual_seed(0)).images
        finally:
            handle.remove()
        return images, seen[0]

    # without the identifier in the prompt, the probe is the pack with its K/V layers reset, bit for bit
    assert (run(pack, "a photo of a dog", gated=True)[0] == run(probed, "a photo of a dog")[0]).all()
    # with it, each token's keys/values come from the pack on the identifier and from post-training elsewhere
    _, gated_kv = run(pack, PROMPT, gated=True)
    _, full_kv = run(pack, PROMPT)
    _, reset_kv = run(probed, PROMPT)
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids[0]
    on = ids == token_id
    assert on.sum() == 1 and not torch.equal(full_kv, reset_kv)
    assert torch.equal(gated_kv[1, on], full_kv[1, on]) and torch.equal(gated_kv[1, ~on], reset_kv[1, ~on])
    assert torch.equal(gated_kv[0], reset_kv[0])  # the negative prompt has no identifier
    assert "forward" not in first_kv.__dict__  # the layer's own forward is back
    assert row_problem("s2_k2+in@0.9:kvtok") is None and "no :kvtok probe" in row_problem("fp_dreambooth:kvtok")

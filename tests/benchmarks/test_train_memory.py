"""The training-memory benchmark: its quantized base is a valid base (it once was refused),
and every method's worker runs a training step on a tiny UNet and accounts for its memory."""

import argparse
import json

import pytest
import torch

from benchmarks.train_memory import METHODS, prepare_base, profile_step, worker
from qpdeploy.base import load_base
from qpdeploy.layers import quant_layers

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                 norm_num_groups=32)
TINY_TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
                 bos_token_id=0, eos_token_id=1, pad_token_id=1)


def test_the_benchmark_base_loads_with_its_integer_weights(tmp_path):
    prepare_base(8, tmp_path / "base", threads=1, unet_config=TINY_UNET)
    base = load_base(tmp_path / "base")
    layers = [layer for _, layer in quant_layers(base.unet)]
    assert layers and all(layer.w_int.dtype.is_signed and layer.w_int.element_size() == 1 for layer in layers)
    assert len(base.meta["source_hash"]) == 64


@pytest.mark.slow
def test_every_method_trains_a_step_and_accounts_for_its_memory(tmp_path):
    prepare_base(8, tmp_path / "base", threads=1, unet_config=TINY_UNET)
    (tmp_path / "configs.json").write_text(json.dumps([TINY_UNET, TINY_TEXT]))
    results = {}
    for method, (kind, bits, options) in METHODS.items():
        if bits == 4 or options.get("low_memory") or options.get("float_gemm"):
            continue  # W4: W8's code with another base; low memory and float GEMMs: process-wide settings
        args = argparse.Namespace(worker=method, threads=1, device="cpu", configs=tmp_path / "configs.json",
                                  base=tmp_path / "base", latent=8, steps=2, workdir=str(tmp_path),
                                  profile=method in ("ours_s2_int8", "lora_r4"))
        results[method] = worker(args)
    trainable = {m: r["trainable_params"] for m, r in results.items()}
    assert trainable["textual_inversion"] == TINY_TEXT["hidden_size"]  # one embedding row
    assert trainable["lora_r4"] == trainable["qlora_r4_int8"] > 0  # the same adapters on float and W8A8
    assert trainable["full_finetune"] > 50 * trainable["lora_r4"]
    assert trainable["ours_s2_int8"] == 2 * trainable["ours_baseline_int8"]  # S2's default K = 2 sets
    assert results["textual_inversion"]["artifact_bytes"] < 1024 < results["lora_r4"]["artifact_bytes"]
    weights = {m: r["breakdown"]["weights_and_buffers_bytes"] for m, r in results.items()}
    assert weights["qlora_r4_int8"] < weights["lora_r4"] / 2  # integer weights stay integer under LoRA
    assert weights["textual_inversion"] > weights["lora_r4"]  # the text encoder stays for TI
    saved = {m: r["breakdown"]["saved_for_backward_bytes"] for m, r in results.items()}
    assert 0 < saved["ours_s2_int8_gc"] < saved["ours_s2_int8"] / 2  # checkpointing keeps block inputs only
    assert all(r["peak_memory_bytes"] > 0 and r["seconds_per_step"] > 0 for r in results.values())
    # the profiled step: ours converts integer weights (copies), both run convolutions
    kinds = {m: results[m]["profile"]["self_seconds_by_kind"] for m in ("ours_s2_int8", "lora_r4")}
    assert all(k["convolution, matmul, attention"] > 0 for k in kinds.values())
    assert kinds["ours_s2_int8"]["copies (ours: integer weights and sums to float)"] > 0
    assert "profile" not in results["full_finetune"]


def test_a_profiled_step_sorts_operators_by_kind():
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    profiled = profile_step(lambda: (a @ b).mul_(2).add(1).to(torch.float64))
    kinds = profiled["self_seconds_by_kind"]
    assert set(kinds) == {"convolution, matmul, attention", "copies (ours: integer weights and sums to float)",
                          "elementwise and small reductions", "other"}
    assert kinds["convolution, matmul, attention"] > 0 and kinds["elementwise and small reductions"] > 0
    assert kinds["copies (ours: integer weights and sums to float)"] > 0  # the float64 conversion
    assert "aten::mm" in profiled["top_ops"] and profiled["top_ops"]["aten::mm"]["calls"] == 1

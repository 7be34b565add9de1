"""The fidelity benchmark's QLoRA-style row: peft LoRA around qpdeploy's quantized linears."""

import pytest
import torch

from benchmarks.fidelity import add_lora
from qpdeploy.layers import QuantLinear, quant_layers


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

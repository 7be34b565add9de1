"""The training-memory benchmark's quantized base is a valid base (it once was refused)."""

from benchmarks.train_memory import prepare_base
from qpdeploy.base import load_base
from qpdeploy.layers import quant_layers

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                 norm_num_groups=32)


def test_the_benchmark_base_loads_with_its_integer_weights(tmp_path):
    prepare_base(8, tmp_path / "base", threads=1, unet_config=TINY_UNET)
    base = load_base(tmp_path / "base")
    layers = [layer for _, layer in quant_layers(base.unet)]
    assert layers and all(layer.w_int.dtype.is_signed and layer.w_int.element_size() == 1 for layer in layers)
    assert len(base.meta["source_hash"]) == 64

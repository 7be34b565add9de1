import pytest
import torch
from torch import nn

from qpdeploy import layers
from qpdeploy.calibrate import sqnr_db
from qpdeploy.intervals import Intervals
from qpdeploy.layers import (QuantConv2d, QuantLinear, ScaleRouter, fake_quant, pack_int4, unpack_int4,
                             weight_qrange)
from qpdeploy.qunet import integer_weight, search_weight_scale


def make_linear(c_in=24, c_out=40, bits=8, act_bits=8, seed=0):
    torch.manual_seed(seed)
    fp = nn.Linear(c_in, c_out)
    layer = QuantLinear.from_float(fp, bits, act_bits)
    scale = search_weight_scale(fp.weight, bits)
    layer.set_int_weight(integer_weight(fp.weight, scale, bits))
    layer.s_ptq.copy_(scale)
    layer.act_scale.fill_(4.0 / 127)
    return fp, layer


@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (5, 7), (1, 1), (3, 5, 1, 1)])
def test_int4_pack_round_trip_is_exact(shape):
    lo, hi = weight_qrange(4)
    w = torch.randint(lo, hi + 1, shape, dtype=torch.int8)
    packed = pack_int4(w)
    assert packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, w.shape), w)


def test_int4_layer_stores_half_the_bytes_of_int8():
    conv = nn.Conv2d(64, 32, 3)
    int8 = QuantConv2d.from_float(conv, weight_bits=8)
    int4 = QuantConv2d.from_float(conv, weight_bits=4)
    assert int8.w_int.nbytes == 64 * 32 * 9
    assert int4.w_int.nbytes == int8.w_int.nbytes // 2


def test_quantized_linear_matches_the_float_reference_math():
    fp, layer = make_linear()
    x = torch.randn(3, 5, 24)
    w = layer.int_weight().float() * layer.s_ptq[:, None]
    expected = fake_quant(x, layer.act_scale[0, 0]) @ w.T + fp.bias
    assert torch.allclose(layer(x), expected, atol=1e-5)
    # and W8A8 stays close to the float layer itself
    assert sqnr_db(fp(x), layer(x)) > 30


def test_each_sample_uses_the_scale_set_of_its_own_interval():
    _, layer = make_linear()
    sets = torch.stack([layer.s_ptq * 0.5, layer.s_ptq * 2.0])  # (E=2, C_out)
    layer.set_scale_sets(sets)
    router = ScaleRouter(Intervals.uniform(3), num_sets=2, set_of_interval=[0, 1, 2])  # 2 = post-training
    object.__setattr__(layer, "router", router)
    x = torch.randn(1, 4, 24).expand(3, -1, -1)  # the same input three times
    router.route(torch.tensor([100, 500, 900]), batch=3, device="cpu")
    y = layer(x) - layer.bias
    assert torch.allclose(y[0], 0.5 * y[2], atol=1e-5)
    assert torch.allclose(y[1], 2.0 * y[2], atol=1e-5)


def test_input_channel_scales_multiply_the_input_before_quantization():
    _, layer = make_linear(act_bits=None)
    s_in = torch.rand(1, 24) + 0.5
    layer.set_scale_sets(layer.s_ptq[None].clone(), s_in)
    router = ScaleRouter(Intervals.uniform(1), num_sets=1, set_of_interval=[0])
    object.__setattr__(layer, "router", router)
    x = torch.randn(2, 24)
    router.route(10, batch=2, device="cpu")
    reference = nn.functional.linear(x * s_in, layer.int_weight().float() * layer.s_ptq[:, None], layer.bias)
    assert torch.allclose(layer(x), reference, atol=1e-5)


def test_fake_quant_straight_through_gradient_is_zero_where_clipped():
    x = torch.tensor([-300.0, -1.0, 0.2, 1.0, 300.0], requires_grad=True)
    fake_quant(x, torch.tensor(1.0)).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    # the range's ends: -128 and 127 (and what rounds to them) pass, what rounds past them does not
    x = torch.tensor([-128.0, -128.4, -128.6, 127.0, 127.4, 127.6, float("nan")], requires_grad=True)
    y = fake_quant(x, torch.tensor(1.0))
    assert y[:6].tolist() == [-128.0, -128.0, -128.0, 127.0, 127.0, 127.0]
    y.nan_to_num().sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("trained", [False, True])
def test_scaling_the_output_or_the_weight_gives_the_same_layer(monkeypatch, trained):
    """The layer multiplies the per-channel scale into whichever of output and weight is
    smaller; both ways are the same function with the same gradients."""
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 20, 3, padding=1)
    layer = QuantConv2d.from_float(conv)
    scale = search_weight_scale(conv.weight, 8)
    layer.set_int_weight(integer_weight(conv.weight, scale, 8))
    layer.s_ptq.copy_(scale)
    layer.act_scale.fill_(4.0 / 127)
    if trained:
        layer.set_scale_sets(torch.stack([layer.s_ptq * 1.3, layer.s_ptq * 0.7]), torch.rand(2, 12) + 0.5)
        router = ScaleRouter(Intervals.uniform(2), num_sets=2, set_of_interval=[0, 1])
        object.__setattr__(layer, "router", router)
        router.route(torch.tensor([100, 900]), batch=2, device="cpu")  # one sample per set
    x0 = torch.randn(2, 12, 6, 6)
    results = []
    for scale_after in (True, False):
        monkeypatch.setattr(QuantConv2d, "scales_output", lambda self, x, v=scale_after: v)
        x = x0.clone().requires_grad_(True)
        tables = [t for t in (layer.s_out, layer.s_in) if t is not None and t.numel()]
        for t in tables:
            t.requires_grad_(True)
            t.grad = None
        y = layer(x)
        y.pow(2).sum().backward()
        results.append([y.detach(), x.grad] + [t.grad for t in tables])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    assert len(results[0]) == (4 if trained else 2)


@pytest.mark.parametrize("bits", [8, 4])
def test_training_scales_saves_no_float_weight_for_backward(bits):
    """The memory claim: backward keeps integer weights, never a float copy of one."""
    torch.manual_seed(0)
    widths = [96, 160, 224, 288]
    router = ScaleRouter(Intervals.uniform(1), num_sets=1, set_of_interval=[0])
    layers = []
    for c_in, c_out in zip(widths, widths[1:]):
        _, layer = make_linear(c_in, c_out, bits=bits)
        layer.set_scale_sets(layer.s_ptq[None].clone())
        layer.s_out.requires_grad_(True)
        object.__setattr__(layer, "router", router)
        layers.append(layer)
    router.route(0, batch=2, device="cpu")
    stack = nn.Sequential(*layers)
    float_weight_bytes = {l.out_features * l.in_features * 4 for l in layers}  # fp32 copies we must not see
    float_weight_shapes = {(l.out_features, l.in_features) for l in layers}
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype, t.numel() * t.element_size()))
        return t

    x = torch.randn(2, 3, widths[0])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = stack(x).pow(2).mean()
    loss.backward()
    float_saved = [s for s in saved if s[1].is_floating_point]
    assert not [s for s in float_saved if s[0] in float_weight_shapes or s[2] in float_weight_bytes]
    # The first layer's input needs no gradient, so nothing of its weight is kept; every
    # later layer keeps its integer weight once, as itself (int8, or packed uint8 for INT4).
    weight_saved = sorted(s[0] for s in saved if s[1] in (torch.int8, torch.uint8))
    assert weight_saved == sorted(tuple(l.w_int.shape) for l in layers[1:])
    assert all(l.s_out.grad is not None and l.s_out.grad.abs().sum() > 0 for l in layers)


def test_gradient_reaches_only_the_scale_sets_that_were_used():
    _, layer = make_linear()
    layer.set_scale_sets(torch.stack([layer.s_ptq] * 3))
    layer.s_out.requires_grad_(True)
    router = ScaleRouter(Intervals.uniform(3), num_sets=3, set_of_interval=[0, 1, 2])
    object.__setattr__(layer, "router", router)
    router.route(torch.tensor([900, 900]), batch=2, device="cpu")  # interval 2 only
    layer(torch.randn(2, 24)).sum().backward()
    grad_norm = layer.s_out.grad.abs().sum(dim=1)
    assert grad_norm[0] == 0 and grad_norm[1] == 0 and grad_norm[2] > 0


def test_a_layer_of_a_routed_unet_called_before_routing_is_an_error():
    from qpdeploy.intervals import Intervals
    from qpdeploy.layers import ScaleRouter

    router = ScaleRouter(Intervals.uniform(4), num_sets=4, set_of_interval=[0, 1, 2, 3])
    with pytest.raises(RuntimeError, match="ran before its UNet call was routed"):
        router.selection(2, "cpu")
    router.route(torch.tensor([100, 900]), 2, "cpu")
    interval, scale_set = router.selection(2, "cpu")
    assert interval.tolist() == [0, 3] and scale_set.tolist() == [0, 3]


# -- the integer forward (an exact int8 GEMM, where the CPU has one) ----------------------

needs_int_gemm = pytest.mark.skipif(not layers.int_gemm_available(),
                                    reason="no exact int8 GEMM on this CPU (needs VNNI or AMX)")


@needs_int_gemm
@pytest.mark.parametrize("kernel, stride, padding, size", [(3, 1, 1, (7, 9)), (3, 2, 1, (8, 7)), (1, 1, 0, (5, 6)),
                                                           (3, 1, 0, (6, 6)), (1, 2, 0, (7, 7))])
def test_integer_convolution_is_exactly_the_convolution_of_the_integers(kernel, stride, padding, size):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-128, 128, (2, 11, *size), generator=g, dtype=torch.int8)
    weight = torch.randint(-127, 128, (13, 11, kernel, kernel), generator=g, dtype=torch.int8)
    sums = layers.int_conv2d(codes, weight, stride, padding)
    expected = nn.functional.conv2d(codes.double(), weight.double(), stride=stride, padding=padding)
    assert sums.dtype == torch.int32 and torch.equal(sums.double(), expected)


def _layer_pair(kind, split):
    torch.manual_seed(0)
    if kind == "conv":
        layer = QuantConv2d.from_float(nn.Conv2d(16, 24, 3, stride=2, padding=1), split=split)
        x = torch.randn(3, 16, 9, 9)
    else:
        layer = QuantLinear.from_float(nn.Linear(16, 24), split=split)
        x = torch.randn(3, 5, 16)
    layer.set_int_weight(torch.randint(-127, 128, layer.weight_shape, dtype=torch.int8))
    layer.s_ptq.copy_(torch.rand(24) * 0.01 + 0.001)
    layer.act_scale = torch.tensor([[0.02, 0.05] if split else [0.03]])
    layer.set_scale_sets(torch.stack([layer.s_ptq * 1.3, layer.s_ptq * 0.7]), torch.rand(2, 16) + 0.5)
    router = ScaleRouter(Intervals.uniform(2), num_sets=2, set_of_interval=[0, 1])
    object.__setattr__(layer, "router", router)
    router.route(torch.tensor([100, 900, 300]), batch=3, device="cpu")
    return layer, x


@needs_int_gemm
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("split", [0, 6])
def test_the_integer_forward_is_the_float_forward_without_its_rounding_and_has_its_gradients(monkeypatch, kind,
                                                                                            split):
    layer, x0 = _layer_pair(kind, split)
    calls = []
    int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(a.shape) or int_mm(a, b))
    results = []
    for integers in (True, False):
        monkeypatch.setattr(layers, "int_gemm_available", lambda v=integers: v)
        x = x0.clone().requires_grad_(True)
        for t in (layer.s_out, layer.s_in):
            t.requires_grad_(True)
            t.grad = None
        y = layer(x)
        (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()  # the same upstream gradient
        results.append([y.detach(), layer.s_out.grad, x.grad, layer.s_in.grad])
    assert len(calls) == (2 if split else 1)  # the integer run only: one GEMM per channel group
    (y_int, s_out_int, *grads_int), (y_float, s_out_float, *grads_float) = results
    assert torch.allclose(y_int, y_float, rtol=1e-5, atol=1e-5 * y_float.abs().max().item())
    assert torch.allclose(s_out_int, s_out_float, rtol=1e-5, atol=1e-5 * s_out_float.abs().max().item())
    for a, b in zip(grads_int, grads_float):  # input and s_in gradients: the same ops, bit for bit
        assert torch.equal(a, b)


@needs_int_gemm
def test_the_integer_forward_computes_what_the_int8_engine_computes():
    """z = a * sum(codes * W_int), exact in the integers: no float rounding inside the sum."""
    layer, x = _layer_pair("linear", 0)
    layer.set_scale_sets(layer.s_ptq[None].clone())  # one set, post-training scales: y = s_ptq * z + bias
    object.__setattr__(layer, "router", None)
    a = layer.act_scale[0, 0]
    codes = torch.clamp(torch.round(x / a), -128, 127).double()
    exact = (codes @ layer.int_weight().double().T) * a.double()
    z = (layer(x) - layer.bias).double() / layer.s_ptq.double()
    assert torch.allclose(z, exact, rtol=1e-6, atol=1e-6 * exact.abs().max().item())


def test_an_int8_gemm_that_saturates_is_not_used(monkeypatch):
    """Without VNNI, x86 int8 kernels add pairs of products in saturating int16: the check
    catches that, and the layers keep the float path."""
    def saturating(a, b):
        products = a.int()[:, :, None] * b.int()[None]  # (M, K, N)
        pairs = products[:, 0::2] + products[:, 1::2]
        return pairs.clamp(-32768, 32767).sum(dim=1, dtype=torch.int32)

    layers.int_gemm_available.cache_clear()
    monkeypatch.setattr(torch, "_int_mm", saturating)
    try:
        assert not layers.int_gemm_available()
        layer, x = _layer_pair("linear", 0)
        assert not layer.runs_on_integers(x)
        layers.int_gemm_available.cache_clear()
        monkeypatch.setattr(torch, "_int_mm", lambda a, b: (a.double() @ b.double()).int())  # an exact one
        assert layers.int_gemm_available()
        monkeypatch.setenv(layers.INT_GEMM_ENV, "0")
        layers.int_gemm_available.cache_clear()
        assert not layers.int_gemm_available()  # turned off by the environment
    finally:
        layers.int_gemm_available.cache_clear()


def test_layers_the_integer_path_does_not_compute_keep_the_float_one():
    grouped = QuantConv2d.from_float(nn.Conv2d(8, 8, 3, groups=2))
    dilated = QuantConv2d.from_float(nn.Conv2d(8, 8, 3, dilation=2))
    same = QuantConv2d.from_float(nn.Conv2d(8, 8, 3, padding="same"))
    assert [layer.int_geometry() for layer in (grouped, dilated, same)] == [False] * 3
    assert QuantConv2d.from_float(nn.Conv2d(8, 8, 3, stride=2, padding=1)).int_geometry()
    layer, x = _layer_pair("linear", 0)
    assert not layer.runs_on_integers(x.double()) and not layer.runs_on_integers(x.half())

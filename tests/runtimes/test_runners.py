"""Runners: one interface for ONNX Runtime and the torch reference, the memory-mapped weights
shared by per-interval sessions, and clear errors for unavailable or mismatched backends."""

import pytest
import torch

from qpdeploy.calibrate import sqnr_db
from qpdeploy.errors import QPDeployError
from qpdeploy.exporters.manifest import read_manifest
from qpdeploy.runtimes import RuntimeConfig
from qpdeploy.runtimes.runners import (SessionFromOnnxPath, SharedWeights, load_reference_unet, ort_providers,
                                       unet_runners)


def feeds(manifest, t, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(2, 4, 8, 8, generator=gen), "timestep": torch.full((2,), float(t)),
            "encoder_hidden_states": torch.randn(2, 16, 32, generator=gen)}


def test_ort_and_torch_runners_share_one_interface_and_agree_per_interval(deploy, rt_base_dir, rt_pack_dir):
    manifest = read_manifest(deploy("sd1_s2"))
    ort, ort_of = unet_runners(manifest, RuntimeConfig(threads=1))
    ref, ref_of = unet_runners(manifest, RuntimeConfig(backend="torch", base=str(rt_base_dir("sd1")),
                                                       pack=str(rt_pack_dir("sd1", "s2"))))
    assert (len(ort), ort_of, len(ref), ref_of) == (4, [0, 1, 2, 3], 1, [0, 0, 0, 0])
    with ref[0] as torch_runner:
        for k, t in enumerate((100, 400, 600, 900)):
            with ort[ort_of[k]] as runner:  # Polygraphy's interface: context manager, checked infer
                out = runner.infer(feeds(manifest, t))["noise_pred"]
            assert sqnr_db(torch_runner.infer(feeds(manifest, t))["noise_pred"], out) > 20
    assert not any(r.is_active for r in [*ort, *ref])


def test_per_interval_sessions_read_one_memory_map_of_the_weights(deploy):
    manifest = read_manifest(deploy("sd1_s2"))
    shared = SharedWeights(manifest.file(manifest.unet["weights_file"]))
    graphs = [manifest.file(g["onnx"]) for g in manifest.unet["graphs"]]
    first, second = shared.initializers(graphs[0]), shared.initializers(graphs[1])
    assert first and first.keys() == second.keys()
    assert all(first[name] is second[name] for name in first)  # the same OrtValues, not copies
    mapped = sum(v.numpy().nbytes for v in first.values())
    assert mapped > 0.9 * manifest.data["files"]["unet.weights"]["bytes"]
    feed = {k: v.numpy() for k, v in feeds(manifest, 600).items()}
    own = SessionFromOnnxPath(graphs[2], threads=1)().run(None, feed)[0]
    mine = SessionFromOnnxPath(graphs[2], threads=1, shared=shared)().run(None, feed)[0]
    assert (own == mine).all()  # bit-identical outputs


def test_reference_refuses_a_base_or_pack_the_deploy_dir_was_not_made_from(deploy, rt_base_dir, rt_pack_dir):
    manifest = read_manifest(deploy("sd1_s2"))
    with pytest.raises(QPDeployError, match="is not the base deploy dir .* was exported from"):
        load_reference_unet(manifest, rt_base_dir("sdxl"), rt_pack_dir("sd1", "s2"))
    with pytest.raises(QPDeployError, match="is not the pack deploy dir"):
        load_reference_unet(manifest, rt_base_dir("sd1"), rt_pack_dir("sd1", "s1"))


def test_cuda_without_onnxruntime_gpu_is_one_line():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers() and torch.cuda.is_available():
        pytest.skip("onnxruntime-gpu and a GPU are present")
    assert ort_providers("auto")[0] == ["CPUExecutionProvider"]
    with pytest.raises(QPDeployError, match="device cuda needs onnxruntime-gpu and a CUDA GPU"):
        ort_providers("cuda")


def _int8_weights(graph) -> int:
    """INT8 initializers a DequantizeLinear reads as its data (weights, not zero points)."""
    import onnx

    int8 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    return len({n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"} & int8)


def _optimized(loader, out):
    """``loader``'s session and the number of INT8 weights in the graph ONNX Runtime runs."""
    import onnx
    import onnxruntime

    options = loader.session_options()
    options.optimized_model_filepath = str(out)
    session = onnxruntime.InferenceSession(str(loader.path), options, providers=["CPUExecutionProvider"])
    return session, _int8_weights(onnx.load(str(out), load_external_data=False).graph)


def test_basic_keeps_the_int8_weights_unless_asked_to_fold_and_both_compute_the_graph_exactly(deploy, tmp_path):
    import onnx

    manifest = read_manifest(deploy("sd1_s2"))
    path = manifest.file(manifest.unet["graphs"][1]["onnx"])
    weights = _int8_weights(onnx.load(str(path), load_external_data=False).graph)
    assert weights > 10
    kept, kept_int8 = _optimized(SessionFromOnnxPath(path, threads=1), tmp_path / "kept.onnx")
    folded, folded_int8 = _optimized(SessionFromOnnxPath(path, threads=1, fold_weights=True), tmp_path / "folded.onnx")
    assert kept_int8 == weights  # every weight stays INT8 behind its DequantizeLinear
    assert folded_int8 == 0  # every weight became an FP32 initializer
    feed = {k: v.numpy() for k, v in feeds(manifest, 400).items()}
    plain = SessionFromOnnxPath(path, threads=1, optimization="none")().run(None, feed)[0]
    assert (kept.run(None, feed)[0] == plain).all() and (folded.run(None, feed)[0] == plain).all()
    assert (SessionFromOnnxPath(path, threads=1, arena=False)().run(None, feed)[0] == plain).all()
    with pytest.raises(ValueError, match="fold_weights needs optimization 'basic'"):
        SessionFromOnnxPath(path, optimization="all", fold_weights=True)


def test_folded_weights_keep_the_graphs_numbers_where_prepacked_kernels_would_not(tmp_path):
    # One DequantizeLinear -> MatMul, large enough that ONNX Runtime's prepacked GEMM (used for
    # constant weights) sums in another order than its plain one: with folding and prepacking
    # both on, this graph's output differs from the unoptimized one in the last bits (ORT 1.32).
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    gen = np.random.default_rng(0)
    weight = gen.integers(-127, 128, size=(1024, 512), dtype=np.int8)
    scale = (gen.random(512) + 0.5).astype(np.float32) * 1e-3
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], axis=1),
         helper.make_node("MatMul", ["x", "wf"], ["y"])], "dq_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 512])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(scale, "s"),
         numpy_helper.from_array(np.zeros(512, np.int8), "z")])
    path = tmp_path / "dq_matmul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), path)
    feed = {"x": gen.standard_normal((64, 1024)).astype(np.float32)}
    plain = SessionFromOnnxPath(path, threads=1, optimization="none")().run(None, feed)[0]
    for loader in (SessionFromOnnxPath(path, threads=1), SessionFromOnnxPath(path, threads=1, fold_weights=True)):
        assert (loader().run(None, feed)[0] == plain).all()


def test_calls_reuse_the_shared_arenas_memory_instead_of_faulting_in_fresh_pages(tmp_path):
    """With the shared arena a call takes its buffers from the memory earlier calls (of any
    session) used; without it, every call maps and faults in its large buffers afresh."""
    import resource

    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    shape = [16, 1024, 1024]  # 64 MiB buffers: beyond glibc's largest mmap threshold (32 MiB)
    x, y = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape), helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, [1])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
                               helper.make_node("ReduceMax", ["b"], ["y"], keepdims=0)], "big", [x], [y], [two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "big.onnx"
    onnx.save(model, str(path))
    feed = {"x": np.ones(shape, np.float32)}

    def faults_of_a_later_call(arena: bool) -> int:
        sessions = [SessionFromOnnxPath(path, threads=1, arena=arena)() for _ in range(2)]
        sessions[0].run(None, feed)  # the first session grows the arena; the second reuses it
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        assert sessions[1].run(None, feed)[0] == 2.0
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    pages = 64 * 2**20 // resource.getpagesize()
    assert faults_of_a_later_call(arena=False) > pages // 2  # a 64 MiB buffer faulted in again (measured: all of it)
    assert faults_of_a_later_call(arena=True) < pages // 8  # (measured: none)

"""The engine scheduler: interval dispatch per layout (against the exported graphs and the
torch reference, in dB), mixed batches, residency and prefetch, fixed-batch engines."""

import numpy as np
import pytest
import torch

from qpdeploy.calibrate import sqnr_db
from qpdeploy.exporters.manifest import read_manifest
from qpdeploy.intervals import Intervals
from qpdeploy.runtimes.runners import SessionFromOnnxPath
from qpdeploy.runtimes.engines import IntervalEngines, run_in_batches, summarize
from qpdeploy.runtimes.unet import EngineUNet

LAYOUT_DEPLOYS = {"sd1_s2": "s2", "sd1_multi": "s2", "sd1_masked": "s1"}


def unet_feed(manifest, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = lambda name: [batch if d == "batch" else d for d in  # noqa: E731
                          next(s for s in manifest.unet["inputs"] if s["name"] == name)["shape"]]
    return torch.randn(shape("sample"), generator=gen), torch.randn(shape("encoder_hidden_states"), generator=gen)


_SESSIONS = {}


def direct(manifest, graph: int, sample, t, hidden, selector=None):
    """Run one exported graph with ONNX Runtime directly (the runtime's session settings)."""
    path = manifest.file(manifest.unet["graphs"][graph]["onnx"])
    if path not in _SESSIONS:
        _SESSIONS[path] = SessionFromOnnxPath(path, threads=1)()
    session = _SESSIONS[path]
    feed = {"sample": sample.numpy(), "timestep": np.full(sample.shape[0], t, np.float32),
            "encoder_hidden_states": hidden.numpy()}
    if selector is not None:
        feed[manifest.unet["selector"]["input"]] = np.full(sample.shape[0], selector, np.int32)
    return torch.from_numpy(session.run(None, feed)[0])


@pytest.mark.parametrize("name", [n if n == "sd1_s2" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in LAYOUT_DEPLOYS])  # one layout in the fast subset, all in the full suite
def test_each_layout_runs_the_graph_and_selector_of_the_interval(name, deploy, reference_unet):
    manifest = read_manifest(deploy(name))
    unet, selector = manifest.unet, manifest.unet["selector"]
    reference = reference_unet("sd1", LAYOUT_DEPLOYS[name])
    sample, hidden = unet_feed(manifest)
    with EngineUNet.from_deploy(deploy(name), threads=1) as engine:
        for k in range(4):
            lo, hi = manifest.intervals.bounds(k)
            t = (lo + hi) // 2
            out = engine(sample, torch.tensor(t), hidden, return_dict=False)[0]
            graph = unet["graph_of_interval"][k]
            value = None if selector is None else selector["values"][k]
            # exactly the output of the interval's graph with the interval's selector value ...
            assert torch.equal(out, direct(manifest, graph, sample, t, hidden, value))
            # ... which matches the torch model routed by the same timestep ...
            with torch.no_grad():
                ref = reference(sample, torch.full((2,), float(t)), hidden, return_dict=False)[0]
            right = sqnr_db(ref, out)
            assert right > 20
            # ... and not the scales of any other scale set
            others = [(g, v) for g, v in _dispatch_choices(manifest) if (g, v) != (graph, value)]
            assert others
            for g, v in others:
                assert sqnr_db(ref, direct(manifest, g, sample, t, hidden, v)) < right - 6
        calls = engine.summary()
    assert calls["interval_per_step"] == [0, 1, 2, 3]
    assert calls["engine_per_step"] == [unet["graphs"][unet["graph_of_interval"][k]]["name"] for k in range(4)]


def _dispatch_choices(manifest):
    """Every (graph, selector value) the manifest can dispatch to."""
    unet, selector = manifest.unet, manifest.unet["selector"]
    return sorted({(unet["graph_of_interval"][k], None if selector is None else selector["values"][k])
                   for k in range(manifest.intervals.k)}, key=str)


@pytest.mark.parametrize("name", ["sd1_s2", pytest.param("sd1_multi", marks=pytest.mark.slow)])  # its own deploy dir
def test_a_batch_spanning_intervals_equals_per_sample_calls(name, deploy):
    manifest = read_manifest(deploy(name))
    sample, hidden = unet_feed(manifest, batch=4, seed=1)
    timesteps = torch.tensor([999, 10, 600, 260])  # intervals 3, 0, 2, 1
    with EngineUNet.from_deploy(deploy(name), threads=1) as engine:
        together = engine(sample, timesteps, hidden).sample
        alone = torch.cat([engine(sample[i:i + 1], timesteps[i], hidden[i:i + 1]).sample for i in range(4)])
        first = engine.history[0]
    assert torch.equal(together, alone)
    if name == "sd1_s2":  # one call per graph, in order of first appearance
        assert [c.interval for c in engine.history[:4]] == [3, 0, 2, 1]
    else:  # one call, the selector differs per sample
        assert first.interval == [3, 0, 2, 1] and first.timestep == [999.0, 10.0, 600.0, 260.0]


class StubRunner:
    """A runner that logs activations and returns ``offset + sample`` (tells which one ran)."""

    def __init__(self, name, offset, log, batch=None):
        self.name, self.offset, self.log, self.batch = name, offset, log, batch
        self.is_active = False

    def activate(self):
        self.log.append(("load", self.name))
        self.is_active = True

    def deactivate(self):
        self.log.append(("free", self.name))
        self.is_active = False

    def infer(self, feeds, check_inputs=True):
        assert self.is_active, f"{self.name} ran while not loaded"
        if self.batch is not None:
            assert feeds["sample"].shape[0] == self.batch
        return {"noise_pred": feeds["sample"] + self.offset}


def stub_scheduler(low_memory, log, k=4, batch=None):
    runners = [StubRunner(f"unet_{i}", 100 * i, log, batch) for i in range(k)]
    return IntervalEngines(Intervals.uniform(k), runners, list(range(k)), low_memory=low_memory)


def ddim_timesteps(steps):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(steps_offset=1)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps


def test_low_memory_keeps_one_engine_and_prepares_the_next_ahead():
    log = []
    timesteps = ddim_timesteps(10)
    scheduler = stub_scheduler(True, log)
    with scheduler:
        for image in range(2):  # the second image starts where the first's prefetch wrapped around
            scheduler.expect(timesteps)
            for t in timesteps:
                out = scheduler({"sample": torch.zeros(2, 1)}, torch.full((2,), int(t)))
                assert out[0, 0] == 100 * Intervals.uniform(4).index(int(t))
                assert len(scheduler.resident) <= 2
    loads = [name for event, name in log if event == "load"]
    # every interval visited twice, each loaded ahead of its first step: no stall
    assert loads == ["unet_3", "unet_2", "unet_1", "unet_0", "unet_3", "unet_2", "unet_1", "unet_0", "unet_3"]
    assert scheduler.stalls == 0 and scheduler.peak_resident == 2 and scheduler.loads == 9
    assert summarize(scheduler.history)["switches"] == 7  # 3 -> 2 -> 1 -> 0, twice, plus 0 -> 3
    assert all(not runner.is_active for runner in scheduler.runners)


def test_low_memory_frees_the_engine_left_behind_on_the_background_thread():
    import threading

    log, freed_on = [], []
    timesteps = ddim_timesteps(10)
    scheduler = stub_scheduler(True, log)
    for runner in scheduler.runners:
        def deactivate(free=runner.deactivate):
            freed_on.append(threading.current_thread().name)
            free()
        runner.deactivate = deactivate
    with scheduler:
        for image in range(2):
            scheduler.expect(timesteps)
            for t in timesteps:
                scheduler({"sample": torch.zeros(2, 1)}, torch.full((2,), int(t)))
    # 9 loads: 7 engines left behind, freed on the background thread (close() waits for them
    # first), and the last two, freed by close() itself
    assert len(freed_on) == 9 and all(name.startswith("qpdeploy-prefetch") for name in freed_on[:7])
    assert freed_on[7:] == [threading.current_thread().name] * 2
    active, most = 0, 0
    for event, _ in log:  # in the order they happened, on either thread
        active += 1 if event == "load" else -1
        most = max(most, active)
    assert most == 2 and active == 0 and scheduler.stalls == 0


def test_resident_loads_every_engine_once_and_a_surprise_order_only_stalls():
    log = []
    with stub_scheduler(False, log) as resident:
        for t in (10, 999, 500):
            resident({"sample": torch.zeros(1, 1)}, torch.tensor([t]))
    assert [n for e, n in log if e == "load"] == ["unet_0", "unet_1", "unet_2", "unet_3"]
    assert resident.peak_resident == 4 and resident.stalls == 0
    log.clear()
    with stub_scheduler(True, log) as low:  # ascending timesteps, not announced: each switch loads in place
        for t in (10, 300, 600, 900):
            low({"sample": torch.zeros(1, 1)}, torch.tensor([t]))
    assert low.stalls == 4 and low.peak_resident == 2


def test_fixed_batch_engines_get_chunks_padded_to_their_batch():
    runner = StubRunner("engine", 7.0, [], batch=2)
    runner.activate()
    feeds = {"sample": torch.arange(5.0).reshape(5, 1), "timestep": torch.arange(5.0)}
    out = run_in_batches(runner, feeds, "noise_pred")
    assert torch.equal(out, feeds["sample"] + 7.0)


def test_float_timesteps_map_through_intervals_index():
    log = []
    with stub_scheduler(False, log) as scheduler:
        for t in (249.99, 250.0, 749.5, 1000.0, -0.5):
            scheduler({"sample": torch.zeros(1, 1)}, torch.tensor([t], dtype=torch.float32))
    assert [c.interval for c in scheduler.history] == [0, 1, 2, 3, 0]


def test_an_engine_that_fails_to_load_leaves_nothing_loaded():
    from qpdeploy.errors import QPDeployError

    log = []
    scheduler = stub_scheduler(False, log)

    def broken():
        raise QPDeployError("cannot load unet_2.onnx")

    scheduler.runners[2].activate = broken
    with pytest.raises(QPDeployError, match="unet_2.onnx"):
        scheduler.open()
    assert log == [("load", "unet_0"), ("load", "unet_1"), ("free", "unet_0"), ("free", "unet_1")]
    assert scheduler.resident == []

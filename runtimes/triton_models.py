"""The Python-backend models of a qpdeploy Triton repository (see :mod:`.triton`).

Triton imports each model's ``model.py``, which re-exports one of these classes as
``TritonPythonModel``. ``triton_python_backend_utils`` exists only inside the backend's stub,
so it is imported in ``initialize``. Every model reads its deploy dir from the ``deploy_dir``
parameter and checks the hashes of the files it opens.

A bad request gets an error response naming the problem (and the other requests of the batch
are served); nothing a request carries can stop a model.
"""

from __future__ import annotations

import json
import time
import warnings

import numpy as np
import torch

from qpdeploy.errors import QPDeployError


def _parameters(args: dict) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


class _Model:
    """What every model does at load: read the manifest, build the runtime config."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb

        from qpdeploy.exporters.manifest import read_manifest

        from .config import RuntimeConfig

        self.pb = pb
        self.params = _parameters(args)
        self.manifest = read_manifest(self.params["deploy_dir"], verify_hashes=False)
        self.runtime = RuntimeConfig(backend=self.params.get("backend", "ort"), device=self.params.get("device", "auto"),
                                     threads=int(self.params.get("threads", "0")),
                                     fold_weights=self.params.get("fold_weights", "false") == "true",
                                     arena=self.params.get("arena", "true") == "true", verify_hashes=False)

    def verify(self, *names: str) -> None:
        """Check the hashes of the deploy dir files this model opens (and the manifest's)."""
        for name in names:
            if name:
                self.manifest.verify_file(name)

    def error(self, message: str):
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(message))

    def inputs(self, request, names) -> dict[str, np.ndarray]:
        return {n: self.pb.get_input_tensor_by_name(request, n).as_numpy() for n in names}

    def finalize(self) -> None:
        close = getattr(self, "close", None)
        if close is not None:
            close()


class PartModel(_Model):
    """A float part (``text_encoder``, ``text_encoder_2``, ``vae_decoder``): the batch of all
    requests in one engine call."""

    def initialize(self, args: dict) -> None:
        super().initialize(args)
        from .runners import part_runner

        part = self.params["part"]
        records = {**{e["name"]: e for e in self.manifest.text_encoders}, "vae_decoder": self.manifest.vae_decoder}
        self.record = records[part]
        self.verify(self.record.get("onnx") if self.runtime.backend == "ort" else self.record.get("engine"))
        self.runner = part_runner(self.manifest, self.record, self.runtime)
        self.runner.activate()
        self.names = [s["name"] for s in self.record["inputs"]]
        self.outputs = [s["name"] for s in self.record["outputs"]]

    def execute(self, requests):
        feeds = [self.inputs(r, self.names) for r in requests]
        sizes = [f[self.names[0]].shape[0] for f in feeds]
        batch = {n: torch.from_numpy(np.concatenate([f[n] for f in feeds])) for n in self.names}
        try:
            out = self.runner.infer(batch, check_inputs=False)
        except Exception as exc:  # one failed engine call fails the batch, not the model
            return [self.error(f"{self.record['name']}: {exc}") for _ in requests]
        responses, offset = [], 0
        for size in sizes:
            tensors = [self.pb.Tensor(n, out[n][offset:offset + size].cpu().numpy()) for n in self.outputs]
            responses.append(self.pb.InferenceResponse(output_tensors=tensors))
            offset += size
        return responses

    def close(self) -> None:
        self.runner.deactivate()


class UNetModel(_Model):
    """The UNet: per sample its timestep's interval and its subject's scale row, one engine
    call per interval graph present in the batch (a table layout: one call in all)."""

    def initialize(self, args: dict) -> None:
        super().initialize(args)
        from .unet import EngineUNet

        unet = self.manifest.unet
        graphs = [g.get("onnx") if self.runtime.backend == "ort" else g.get("engine") for g in unet["graphs"]]
        self.verify(*graphs, unet.get("weights_file"), (unet.get("tables") or {}).get("file"))
        self.unet = EngineUNet.from_manifest(self.manifest, self.runtime)
        self.engines = self.unet.engines
        self.names = [s["name"] for s in self.manifest.call_inputs]
        self.output = self.manifest.unet_output
        self.multi_subject = self.manifest.layout == "multi-subject"

    def rows(self, subject: str) -> tuple[int, ...] | None:
        """The subject's scale row per interval ("" = post-training scales)."""
        dispatch = self.manifest.subject_dispatch(subject or None)
        return dispatch.selector_values if self.multi_subject else None

    def execute(self, requests):
        responses: list = [None] * len(requests)
        good, feeds, selector = [], [], []
        for i, request in enumerate(requests):
            try:
                values = self.inputs(request, self.names)
                subjects = self.pb.get_input_tensor_by_name(request, "subject").as_numpy().reshape(-1)
                timesteps = values["timestep"].reshape(-1).astype(np.float32)
                intervals = self.manifest.intervals.index(torch.from_numpy(timesteps)).tolist()
                if len(subjects) != len(intervals):
                    raise QPDeployError(f"got {len(subjects)} subjects for {len(intervals)} samples")
                rows = [self.rows(s.decode("utf-8")) for s in subjects]  # every sample checked first
            except (QPDeployError, UnicodeDecodeError, ValueError) as exc:
                responses[i] = self.error(str(exc))
                continue
            if self.multi_subject:
                selector += [r[k] for r, k in zip(rows, intervals)]
            values["timestep"] = timesteps
            good.append(i)
            feeds.append(values)
        if good:
            sizes = [f["timestep"].shape[0] for f in feeds]
            batch = {n: self.unet._feed(n, torch.from_numpy(np.concatenate([f[n] for f in feeds])))
                     for n in self.names}
            timestep = torch.from_numpy(np.concatenate([f["timestep"] for f in feeds]))
            try:
                noise = self.engines(batch, timestep, selector=selector if self.multi_subject else None)
            except Exception as exc:
                for i in good:
                    responses[i] = self.error(f"unet: {exc}")
                return responses
            intervals = self.manifest.intervals.index(timestep).tolist()
            names = [self.engines.runners[self.engines.runner_of_interval[k]].name for k in intervals]
            offset = 0
            for i, size in zip(good, sizes):
                part = slice(offset, offset + size)
                responses[i] = self.pb.InferenceResponse(output_tensors=[
                    self.pb.Tensor(self.output, noise[part].cpu().numpy()),
                    self.pb.Tensor("interval", np.asarray(intervals[part], dtype=np.int32).reshape(-1, 1)),
                    self.pb.Tensor("engine", np.asarray([n.encode() for n in names[part]], dtype=np.object_)
                                   .reshape(-1, 1))])
                offset += size
        return responses

    def close(self) -> None:
        self.unet.close()


class _RemoteRunner:
    """A runner whose ``infer`` is a call to another model of the repository (BLS)."""

    def __init__(self, pb, model: str, outputs: list[str], scalars_as_columns: bool = False):
        self.pb, self.model, self.outputs, self.name = pb, model, outputs, model
        self.scalars_as_columns = scalars_as_columns  # (B,) feeds sent as (B, 1): a native model's dims [1]

    def activate(self) -> None:
        pass

    def deactivate(self) -> None:
        pass

    def call(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pb = self.pb
        request = pb.InferenceRequest(model_name=self.model, requested_output_names=self.outputs,
                                      inputs=[pb.Tensor(n, v) for n, v in feeds.items()])
        response = request.exec()
        if response.has_error():
            raise QPDeployError(f"{self.model}: {response.error().message()}")
        return {n: pb.get_output_tensor_by_name(response, n).as_numpy() for n in self.outputs}

    def infer(self, feeds: dict[str, torch.Tensor], check_inputs: bool = False) -> dict[str, torch.Tensor]:
        arrays = {n: v.cpu().numpy() for n, v in feeds.items()}
        if self.scalars_as_columns:
            arrays = {n: v.reshape(-1, 1) if v.ndim == 1 else v for n, v in arrays.items()}
        out = self.call(arrays)
        return {n: torch.from_numpy(np.array(v)) for n, v in out.items()}


class _RemoteEngines:
    """What :class:`~.unet.EngineUNet` calls, answered by the repository's ``unet`` model (the
    python platform): every sample goes with the request's subject, and the model reports the
    interval and engine of each sample, recorded as :class:`~.engines.EngineCall`. (Native
    platforms use :class:`~.engines.IntervalEngines` over one BLS runner per graph.)"""

    def __init__(self, pb, manifest):
        self.output = manifest.unet_output
        self.runner = _RemoteRunner(pb, "unet", [self.output, "interval", "engine"])
        self.history: list = []
        self.subject = ""

    def expect(self, timesteps) -> None:
        pass

    def close(self) -> None:
        pass

    def __call__(self, feeds: dict[str, torch.Tensor], timestep: torch.Tensor, selector=None) -> torch.Tensor:
        from .engines import engine_call

        batch = timestep.shape[0]
        arrays = {n: v.cpu().numpy() for n, v in feeds.items()}
        arrays["timestep"] = timestep.to(torch.float32).numpy().reshape(batch, 1)
        arrays["subject"] = np.asarray([self.subject.encode()] * batch, dtype=np.object_).reshape(batch, 1)
        start = time.perf_counter()
        out = self.runner.call(arrays)
        engines = [e.decode() for e in out["engine"].reshape(-1)]
        self.history.append(engine_call(timestep, out["interval"].reshape(-1).tolist(), engines[0],
                                        time.perf_counter() - start))
        return torch.from_numpy(np.array(out[self.output]))

    def summary(self) -> dict:
        from .engines import summarize

        return summarize(self.history)


def _native_engines(pb, manifest):
    """Native platforms: the runtime's own :class:`~.engines.IntervalEngines` (graph and
    selector value per sample, call records) over one BLS runner per UNet graph model, whose
    per-sample scalars (timestep, selector) travel as ``[batch, 1]``."""
    from .engines import IntervalEngines

    runners = [_RemoteRunner(pb, g["name"], [manifest.unet_output], scalars_as_columns=True)
               for g in manifest.unet["graphs"]]
    return IntervalEngines(manifest.intervals, runners, manifest.dispatch.graph_of_interval, manifest.dispatch,
                           manifest.unet_output).open()


class PipelineModel(_Model):
    """The entry point: prompt (and optional negative prompt, subject, seed, steps, guidance,
    scheduler) in, ``image`` (H, W, 3) uint8 and its JSON ``record`` out. Sampling is
    :func:`~.generate.sample_image`, the code ``qpdeploy generate`` runs."""

    def initialize(self, args: dict) -> None:
        super().initialize(args)
        from qpdeploy.exporters.manifest import MANIFEST_FILE
        from qpdeploy.io import file_sha256

        from .pipeline import assemble_pipeline
        from .unet import EngineUNet

        def make_runner(record):
            return _RemoteRunner(self.pb, record["name"], [s["name"] for s in record["outputs"]])

        _, folders = self.manifest.referenced()  # tokenizer(s) and scheduler: read here
        self.verify(*[n for n in self.manifest.data["files"] if any(n.startswith(f"{f}/") for f in folders)])
        native = self.params.get("platform", "python") != "python"
        self.remote = _native_engines(self.pb, self.manifest) if native else _RemoteEngines(self.pb, self.manifest)
        self.pipe = assemble_pipeline(self.manifest, None, make_runner,
                                      lambda: EngineUNet(self.manifest, self.remote, "cpu", self.runtime))
        self.schedulers = {None: self.pipe.scheduler}
        self.context = {"deploy_dir": str(self.manifest.path),
                        "manifest_sha256": file_sha256(self.manifest.path / MANIFEST_FILE), "load_seconds": 0.0,
                        "size": tuple(self.manifest.size)}

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self.serve(request))
            except (QPDeployError, ValueError, UnicodeDecodeError) as exc:
                responses.append(self.error(str(exc).splitlines()[0]))
            except Exception as exc:  # a failure inside sampling: an error response, the model keeps serving
                responses.append(self.error(f"{type(exc).__name__}: {exc}"))
        return responses

    def _value(self, request, name: str, default=None):
        tensor = self.pb.get_input_tensor_by_name(request, name)
        if tensor is None:
            return default
        value = tensor.as_numpy().reshape(-1)
        if value.size != 1:
            raise QPDeployError(f"{name} must hold one value, got {value.size}")
        value = value[0]
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                raise QPDeployError(f"{name} is not UTF-8 text") from None
        return value.item()

    def settings(self, request):
        """The request as ``(prompt, seed, GenerateConfig)``; bad values raise one line."""
        from .config import GenerateConfig
        from .generate import check_prompts, check_request

        prompt = self._value(request, "prompt")
        if prompt is None:
            raise QPDeployError("prompt is required")
        negative = self._value(request, "negative_prompt") or None
        subject = self._value(request, "subject") or None
        recommended = self.manifest.sampling
        steps = self._value(request, "steps", recommended.get("steps", GenerateConfig.steps))
        guidance = self._value(request, "guidance", recommended.get("guidance", GenerateConfig.guidance))
        config = GenerateConfig(steps=int(steps), guidance=float(guidance),
                                scheduler=self._value(request, "scheduler") or None,
                                seed=int(self._value(request, "seed", 0)), negative_prompt=negative, subject=subject)
        check_prompts([prompt], config, ("prompt", "negative_prompt"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_request(self.manifest, [prompt], config)  # an unknown subject raises
        return prompt, config, [str(w.message) for w in caught]

    def serve(self, request):
        from .generate import sample_image
        from .pipeline import load_scheduler

        prompt, config, notes = self.settings(request)
        if config.scheduler not in self.schedulers:
            self.schedulers[config.scheduler] = load_scheduler(self.manifest.scheduler_folder, config.scheduler)
        self.pipe.scheduler = self.schedulers[config.scheduler]
        if isinstance(self.remote, _RemoteEngines):  # native platforms serve no subjects
            self.remote.subject = config.subject or ""
        image, record = sample_image(self.pipe, prompt, config.seed, config, self.runtime, self.manifest, self.context)
        record.update(served_by="triton", warnings=notes)
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        text = np.asarray([json.dumps(record).encode()], dtype=np.object_)
        return self.pb.InferenceResponse(output_tensors=[self.pb.Tensor("image", pixels),
                                                         self.pb.Tensor("record", text)])

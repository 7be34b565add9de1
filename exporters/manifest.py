"""The deploy directory and its ``manifest.json``: written by ``qpdeploy export``, read by the runtime.

A deploy dir holds everything ``qpdeploy generate`` needs and nothing else::

    manifest.json          this format (below)
    report.json            export figures (layout, graphs, SQNR vs torch, bytes, seconds)
    unet.onnx | unet_0.onnx, unet_1.onnx, ...   UNet graph(s) with Q/DQ (opset in the manifest)
    unet.weights           external data shared by every UNet graph (INT8 weights, float params)
    text_encoder.onnx      float text encoder (text_encoder_2.onnx for SDXL)
    vae_decoder.onnx       float VAE decoder
    tokenizer/             tokenizer files (tokenizer_2/ for SDXL), saved with save_pretrained
    scheduler/             scheduler_config.json
    *.plan, trt_timing.cache   TensorRT engines and their timing cache, when built

``manifest.json`` (format version 1)::

    format_version, kind ("qpdeploy.deploy"), qpdeploy_version
    base_hash, pack_hash (null: post-training export), strategy (null without a pack)
    intervals: {"boundaries": [0, ..., T]}   -> qpdeploy.intervals.Intervals (Intervals.index(t))
    s1_intervals: [...]
    family ("sd1" | "sd2" | "sdxl"), pipeline: {"class", "config"}
    height, width, batch, vae_scale_factor, opset, export: the ExportConfig
    unet: {
      layout: "per-interval" | "masked" | "multi-expert" | "multi-subject",
      graphs: [{"name", "onnx", "intervals": [k, ...], "engine": file or null}],
      graph_of_interval: [g_0, ..., g_{K-1}]     index into graphs for each interval
      selector: null (per-interval) or {"input": "tuned" | "expert",
                 "values": [v_0, ..., v_{K-1}]}  int32 value to feed (one per sample) in interval k
      weights_file, inputs, outputs: [{"name", "dtype", "shape"}] ("batch" = dynamic dim)
      config: the diffusers UNet config, qdq_layers, weight_bits, act_bits, act_scales
      tables: (multi-subject only) {"file": "subjects-<hash>.safetensors", "rows": R,
               "input_scales": bool, "inputs": [{"name", "dtype", "shape": ["rows", ...]}]}
    }
    subjects: (multi-subject only) [{"identifier", "pack_hash", "strategy", "s1_intervals",
              "first_row", "sets", "rows_of_interval": [row per interval], "input_scales",
              "prompt", "class_prompt"}]   (exporters.subjects.SubjectRecord; row 0: post-training)
    text_encoders: [{"name", "onnx", "tokenizer", "engine", "inputs", "outputs"}]
    vae_decoder: {"name", "onnx", "engine", "inputs", "outputs", "scaling_factor", "shift_factor"}
    scheduler: "scheduler"
    engines: null or {"tensorrt_version", "device", "compute_capability", "precision",
                      "timing_cache", "batch", "height", "width"}
    sampling: (optional) the source model's recommended {"guidance", "steps"}, which
              generate uses when the user gives none (qpdeploy.models.SAMPLING_FILE)
    files: {relative path: {"bytes", "sha256"}} for every file but manifest.json and report.json

UNet inputs: ``sample`` float32 (batch, 4, h, w); ``timestep`` float32 (batch,);
``encoder_hidden_states`` float32 (batch, L, D); SDXL adds ``text_embeds`` float32 (batch, P)
and ``time_ids`` float32 (batch, 6); table layouts add the selector int32 (batch,). Output
``noise_pred`` float32 (batch, 4, h, w). Per step the runtime computes
``k = intervals.index(t)`` and runs ``graphs[graph_of_interval[k]]``, feeding
``selector.values[k]`` to the selector input when there is one (:class:`Dispatch`, the one rule every reader uses).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qpdeploy.errors import QPDeployError
from qpdeploy.intervals import Intervals
from qpdeploy import schema
from qpdeploy.io import INCOMPLETE_MARKER, file_sha256, read_artifact_header, write_json
from qpdeploy.schema import relative_path, validate

MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.json"
DEPLOY_KIND = "qpdeploy.deploy"
DEPLOY_FORMAT_VERSION = 1
DEPLOY_ARTIFACT = (MANIFEST_FILE, DEPLOY_KIND)  # header file and kind: what --force may replace


def write_manifest(out_dir, manifest: dict) -> dict:
    """Add the ``files`` table (size and SHA-256 of every file) and write manifest.json.

    Returns:
        The manifest as written.
    """
    out_dir = Path(out_dir)
    files = {}
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(out_dir).as_posix()
        if rel not in (MANIFEST_FILE, REPORT_FILE, INCOMPLETE_MARKER):
            files[rel] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {"format_version": DEPLOY_FORMAT_VERSION, "kind": DEPLOY_KIND, **manifest, "files": files}
    write_json(out_dir / MANIFEST_FILE, manifest)
    return manifest


@dataclass(frozen=True)
class Dispatch:
    """The one rule for which UNet graph serves interval k and what its selector input gets.

    The exporter's plan, the manifest, export verification and the runtime's scheduler all
    use it. ``graph_of_interval[k]`` indexes the graphs; a one-graph layout has a selector
    input (``tuned`` / ``expert``) fed ``selector_values[k]`` for every sample in interval k.
    """

    graph_of_interval: tuple[int, ...]
    selector: str | None = None
    selector_values: tuple[int, ...] | None = None

    def graph(self, k: int) -> int:
        """Index of the graph that serves interval ``k``."""
        return self.graph_of_interval[k]

    def selector_feed(self, intervals) -> dict:
        """``{selector input: int32 (B,)}`` for samples in ``intervals`` (B,); empty without a selector."""
        import torch

        if self.selector is None:
            return {}
        return {self.selector: torch.tensor([self.selector_values[int(k)] for k in intervals], dtype=torch.int32)}

    @classmethod
    def from_manifest(cls, unet: dict) -> "Dispatch":
        selector = unet["selector"]
        return cls(tuple(unet["graph_of_interval"]), None if selector is None else selector["input"],
                   None if selector is None else tuple(selector["values"]))


@dataclass(frozen=True)
class DeployManifest:
    """A validated manifest of a deploy dir; ``data`` is the parsed JSON."""

    path: Path
    data: dict

    @property
    def intervals(self) -> Intervals:
        return Intervals.from_json(self.data["intervals"])

    @property
    def unet(self) -> dict:
        return self.data["unet"]

    @property
    def layout(self) -> str:
        return self.unet["layout"]

    # Typed access to what readers use, so the JSON keys are spelled in this module only.
    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels the graphs were exported for."""
        return self.data["height"], self.data["width"]

    @property
    def vae_scale_factor(self) -> int:
        return self.data["vae_scale_factor"]

    @property
    def opset(self) -> int:
        return self.data["opset"]

    @property
    def hashes(self) -> tuple[str, str | None]:
        """(base hash, pack hash or None) the deploy dir was exported from."""
        return self.data["base_hash"], self.data["pack_hash"]

    @property
    def pack_strength(self) -> float | tuple[float, ...]:
        """How much of its pack(s) the deploy dir holds (``ExportConfig.pack_strength``: one
        number, or one per interval; 1 when the manifest predates the setting)."""
        from qpdeploy.config import strength_problem

        value = self.data.get("export", {}).get("pack_strength", 1.0)
        problem = strength_problem(value)
        if problem:
            raise QPDeployError(f"{self.path / MANIFEST_FILE}: export.pack_strength: {problem}")
        return tuple(float(v) for v in value) if isinstance(value, list) else float(value)

    @property
    def pipeline(self) -> dict:
        """``{"class", "config"}`` of the diffusers pipeline to assemble."""
        return self.data["pipeline"]

    @property
    def sampling(self) -> dict:
        """The source model's recommended sampling (``guidance``, ``steps``); {} when none."""
        from qpdeploy.models import check_sampling_defaults

        return check_sampling_defaults(self.data.get("sampling", {}), self.path / MANIFEST_FILE)

    @property
    def scheduler_folder(self) -> Path:
        return self.file(self.data["scheduler"])

    @property
    def text_encoders(self) -> list[dict]:
        return self.data["text_encoders"]

    @property
    def vae_decoder(self) -> dict:
        return self.data["vae_decoder"]

    @property
    def engines(self) -> dict | None:
        return self.data["engines"]

    @property
    def unet_inputs(self) -> list[dict]:
        return self.unet["inputs"]

    @property
    def call_inputs(self) -> list[dict]:
        """The UNet inputs a caller feeds: every graph input but the selector, which the
        runtime sets from each sample's interval (and subject)."""
        selector = self.dispatch.selector
        return [spec for spec in self.unet_inputs if spec["name"] != selector]

    @property
    def unet_output(self) -> str:
        """Name of the UNet graphs' noise-prediction output."""
        return self.unet["outputs"][0]["name"]

    @property
    def unet_config(self) -> dict:
        return self.unet["config"]

    def file_bytes(self, name: str) -> int:
        """Size of a file as the files table records it."""
        return self.data["files"][name]["bytes"]

    def file(self, name: str) -> Path:
        """Absolute path of a file or folder named in the manifest, confined to the deploy dir.

        Raises:
            QPDeployError: the name is absolute, climbs out with ``..``, or resolves (through
                a symbolic link) to a place outside the deploy dir.
        """
        root = self.path.resolve()
        if not relative_path(name):
            raise QPDeployError(f"{self.path / MANIFEST_FILE} names {name!r}, which is not a path inside the deploy dir")
        resolved = (root / name).resolve()
        if root not in resolved.parents:
            raise QPDeployError(f"{self.path / MANIFEST_FILE}: {name} leads outside the deploy dir (to {resolved})")
        return resolved

    @property
    def dispatch(self) -> Dispatch:
        return Dispatch.from_manifest(self.unet)

    @property
    def subjects(self) -> list[dict]:
        """The subjects of a multi-subject deploy dir (their manifest records; [] otherwise)."""
        return self.data.get("subjects", [])

    def subject_dispatch(self, subject: str | None) -> Dispatch:
        """The dispatch of one subject of a multi-subject deploy dir: its table row in every
        interval (post-training, row 0, for ``subject=None``).

        Raises:
            QPDeployError: an unknown subject (naming the ones there are), or a subject asked
                of a deploy dir that holds one pack.
        """
        dispatch = self.dispatch
        if self.layout != "multi-subject":
            if subject is not None:
                raise QPDeployError(f"deploy dir {self.path} holds one scale pack, not subjects by name; "
                                    "drop --subject (or export several packs to the multi-subject layout)")
            return dispatch
        if subject is None:
            return dispatch
        for record in self.subjects:
            if record["identifier"] == subject:
                return Dispatch(dispatch.graph_of_interval, dispatch.selector, tuple(record["rows_of_interval"]))
        known = ", ".join(r["identifier"] for r in self.subjects) or "none"
        raise QPDeployError(f"no subject {subject!r} in deploy dir {self.path} (subjects: {known})")

    def referenced(self) -> tuple[list[str], list[str]]:
        """``(files, folders)`` the runtime may open: graphs, engines, the shared weights,
        tokenizer and scheduler folders."""
        data, unet = self.data, self.unet
        parts = [*unet["graphs"], *data["text_encoders"], data["vae_decoder"]]
        files = [p[key] for p in parts for key in ("onnx", "engine") if p.get(key) is not None]
        if unet.get("weights_file"):
            files.append(unet["weights_file"])
        if unet.get("tables"):
            files.append(unet["tables"]["file"])
        folders = [data["scheduler"], *(t["tokenizer"] for t in data["text_encoders"])]
        return files, folders

    def verify_files(self) -> None:
        """Check every listed file's size and SHA-256 (slow for big models).

        Raises:
            QPDeployError: naming the first missing, resized or altered file.
        """
        for name in self.data["files"]:
            self.verify_file(name)

    def verify_file(self, name: str) -> Path:
        """Check one listed file's size and SHA-256; returns its path.

        Raises:
            QPDeployError: the file is missing, resized or altered.
        """
        record = self.data["files"][name]
        path = self._existing(name, record)
        if file_sha256(path) != record["sha256"]:
            raise QPDeployError(f"{path} does not match its hash in {MANIFEST_FILE} (corrupted or replaced)")
        return path

    def _existing(self, name: str, record: dict) -> Path:
        path = self.file(name)
        if not path.is_file():
            raise QPDeployError(f"deploy dir {self.path} is missing {name} (listed in {MANIFEST_FILE})")
        if path.stat().st_size != record["bytes"]:
            raise QPDeployError(f"{path} has {path.stat().st_size} bytes, {MANIFEST_FILE} says {record['bytes']}")
        return path


def read_manifest(path, verify_hashes: bool = False) -> DeployManifest:
    """Read and validate ``<deploy dir>/manifest.json``.

    Always checks the kind, format version, required keys, that the interval maps fit the
    intervals and that every listed file exists with its recorded size; with
    ``verify_hashes`` also each file's SHA-256.

    Raises:
        QPDeployError: one line naming the problem (the file, the key, the value).
    """
    path = Path(path)
    data = read_artifact_header(path, MANIFEST_FILE, DEPLOY_KIND, "deploy dir", DEPLOY_FORMAT_VERSION)
    where = path / MANIFEST_FILE
    validate(data, schema.MANIFEST, where)
    for name, record in data["files"].items():
        validate(record, schema.FILE_RECORD, where, f"files.{name}.")
    manifest = DeployManifest(path, data)
    _check_unet_maps(manifest)
    for name, record in data["files"].items():
        manifest._existing(name, record)
    _check_coverage(manifest)
    if verify_hashes:
        manifest.verify_files()
    return manifest


def _check_coverage(manifest: DeployManifest) -> None:
    """Every file the runtime may open is in the files table (so the hash check covers it):
    each referenced file, and every file inside each referenced folder."""
    where, listed = manifest.path / MANIFEST_FILE, manifest.data["files"]
    files, folders = manifest.referenced()
    for name in files:
        manifest.file(name)
        if name not in listed:
            raise QPDeployError(f"{where}: {name} is used but not in the files table")
    root = manifest.path.resolve()
    for path in root.rglob("*"):  # a link inside that leads outside could be opened by a graph's external data
        if path.is_symlink() and root not in path.resolve().parents:
            raise QPDeployError(f"deploy dir {manifest.path}: {path.relative_to(root)} is a link leading outside it")
    for name in folders:
        folder = manifest.file(name)
        if not folder.is_dir():
            raise QPDeployError(f"deploy dir {manifest.path} is missing the folder {name}")
        for path in folder.rglob("*"):
            rel = path.relative_to(root).as_posix()
            if path.is_symlink() or (path.is_file() and rel not in listed):
                raise QPDeployError(f"{where}: {rel} is in the folder {name} but not in the files table")


def _check_unet_maps(manifest: DeployManifest) -> None:
    unet, k = manifest.unet, manifest.intervals.k
    where = manifest.path / MANIFEST_FILE
    graphs, graph_of = unet["graphs"], unet["graph_of_interval"]
    if len(graph_of) != k or any(not 0 <= g < len(graphs) for g in graph_of):
        raise QPDeployError(f"{where}: unet.graph_of_interval {graph_of} does not map {k} intervals to {len(graphs)} graphs")
    for graph in graphs:
        if graph.get("onnx") not in manifest.data["files"]:
            raise QPDeployError(f"{where}: UNet graph {graph.get('name')} names a file not in the files table")
    selector = unet["selector"]
    if selector is not None and len(selector.get("values", ())) != k:
        raise QPDeployError(f"{where}: unet.selector.values must have one value per interval ({k})")
    if (selector is None) != (unet["layout"] == "per-interval"):
        raise QPDeployError(f"{where}: layout {unet['layout']} and selector {selector} disagree")
    if (unet["layout"] == "multi-subject") != ("tables" in unet):
        raise QPDeployError(f"{where}: layout {unet['layout']} and unet.tables disagree")
    if "tables" in unet:
        validate(unet["tables"], schema.SUBJECT_TABLES, where, "unet.tables.")
        rows = 1
        for i, record in enumerate(manifest.subjects):
            validate(record, schema.SUBJECT, where, f"subjects[{i}].")
            last = record["first_row"] + record["sets"]
            if record["first_row"] != rows or len(record["rows_of_interval"]) != k or \
                    any(r != 0 and not record["first_row"] <= r < last for r in record["rows_of_interval"]):
                raise QPDeployError(f"{where}: subjects[{i}] ({record['identifier']}) owns rows that do not follow "
                                    "the subjects before it or leave its own")
            rows = last
        if rows != unet["tables"]["rows"]:
            raise QPDeployError(f"{where}: the subjects own {rows} table rows, unet.tables.rows says {unet['tables']['rows']}")

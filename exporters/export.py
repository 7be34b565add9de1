"""``qpdeploy export``: a quantized base plus a scale pack -> a self-contained deploy dir.

See :mod:`qpdeploy.exporters.manifest` for the deploy dir's format.
"""

from __future__ import annotations

import time
from pathlib import Path

from qpdeploy.config import is_full_strength
from qpdeploy.errors import QPDeployError
from qpdeploy.io import atomic_dir, check_output, claim_output, dir_bytes, write_json
from qpdeploy.pack import pack_hash

from .config import ExportConfig
from .engines import EngineJob, build_engines, require_tensorrt
from .manifest import DEPLOY_ARTIFACT, REPORT_FILE, write_manifest
from .parts import export_parts, pipeline_record
from .subjects import LAYOUT as SUBJECTS_LAYOUT
from .unet import UNetPlan, default_layout, export_unet, plan_unet
from .verify import check_graph, compare_with_torch, expected_qdq_units, qdq_structure


def export_from_paths(base_dir, pack_dir, out, config: ExportConfig, model=None, config_dir=None,
                      force: bool = False, show_progress: bool | str = False) -> tuple[Path, dict]:
    """Load a base directory (and a pack directory, several, or None) and export them to ``out``.

    Several packs (or ``config.layout == "multi-subject"``) make a multi-subject deploy dir
    (:func:`export_subjects`). ``model`` / ``config_dir`` locate the base's source model if
    it moved (see :func:`qpdeploy.base.load_base_pipeline`). Returns ``(path, report)``.
    """
    from qpdeploy.base import load_base, load_base_pipeline
    from qpdeploy.pack import apply_pack, load_pack

    pack_dirs = [] if pack_dir is None else list(pack_dir) if isinstance(pack_dir, (list, tuple)) else [pack_dir]
    with claim_output(out, force, DEPLOY_ARTIFACT, inputs=[base_dir, *pack_dirs, model, config_dir]):
        if config.build_engines:
            require_tensorrt()
        base = load_base(base_dir)
        packs = [(load_pack(p), p) for p in pack_dirs]
        for pack, _ in packs:
            apply_pack(base, pack)  # a pack of another base fails here, before the model loads
        pipe = load_base_pipeline(base, model, config_dir)
        if len(packs) > 1 or config.layout == SUBJECTS_LAYOUT:
            return export_subjects(base, pipe, out, config, packs, force, show_progress)
        return export_deploy(base, pipe, out, config, packs[0][0] if packs else None, force, show_progress)


def export_deploy(base, pipe, out, config: ExportConfig, pack=None, force: bool = False,
                  show_progress: bool | str = False) -> tuple[Path, dict]:
    """Write the deploy dir of ``base`` with ``pack`` installed (None: post-training scales).

    Steps: (1) install the pack and plan the layout, (2) export the UNet graphs sharing one
    weights file, (3) export text encoder(s), VAE decoder, tokenizers and scheduler,
    (4) verify every graph (checker, QDQ rules, ORT vs torch per interval), (5) build
    engines if asked, (6) write manifest.json and report.json. Everything is written to a
    temporary directory renamed to ``out`` at the end, so a failure leaves nothing.

    Returns:
        ``(path, report)``.
    """
    from qpdeploy.pack import apply_pack, at_strength, post_training_scales, reset_to_post_training
    from qpdeploy.progress import stage
    from qpdeploy.token import check_token_record

    start = time.perf_counter()
    check_output(out, force, DEPLOY_ARTIFACT)
    if config.build_engines:
        require_tensorrt()
    # 1. scales and plan (bad combinations fail here, before any export work)
    if pack is None:
        if not is_full_strength(config.pack_strength):
            raise QPDeployError("--pack-strength needs --pack (an export without a pack is the base itself)")
        reset_to_post_training(base)
    else:
        pack = at_strength(pack, post_training_scales(base), config.pack_strength)
        apply_pack(base, pack)
        if pack.token:
            check_token_record(pipe, pack.token, pack.tokens)  # another tokenizer fails here
    layout = config.layout or default_layout(base, None if pack is None else pack.strategy)
    plan = plan_unet(base, layout)
    latent_hw, seq_len, embeds_dim = graph_shapes(pipe, config)
    with atomic_dir(out, force, DEPLOY_ARTIFACT) as tmp, stage("export", _stages(config), show_progress) as advance:
        # 2. UNet graphs
        unet_files = export_unet(base, layout, tmp, latent_hw, seq_len, config.opset, embeds_dim)
        advance()
        # 3-4. the float rest of the pipeline and the checks of every graph
        parts, structure = export_rest(base, pipe, tmp, unet_files, latent_hw, config, [] if pack is None else [pack],
                                       advance)
        sqnr = None
        if config.verify:
            sqnr = compare_unet(base, unet_files, tmp, config)
            advance()
        # 5. engines
        engines = None
        if config.build_engines:
            engines = build_engines(tmp, engine_jobs(unet_files, parts, config, latent_hw),
                                    config.strongly_typed)
            advance()
        # 6. manifest and report
        manifest = write_manifest(tmp, manifest_record(base=base, pack=pack, pipe=pipe, config=config,
                                                       unet_files=unet_files, parts=parts, structure=structure,
                                                       engines=engines, latent_hw=latent_hw))
        report = export_report(base, plan, unet_files, manifest, tmp, structure, sqnr, start)
        write_json(tmp / REPORT_FILE, report)
        advance()
    return Path(out), report


def export_subjects(base, pipe, out, config: ExportConfig, packs: list, force: bool = False,
                    show_progress: bool | str = False) -> tuple[Path, dict]:
    """Write a multi-subject deploy dir: one UNet graph whose scale tables (every subject's
    sets plus the post-training row) are inputs fed from ``subjects-<id>.safetensors``
    (:mod:`.subjects`). ``packs``: ``[(ScalePack, where), ...]``, zero or more, on ``base``.

    Verification runs every subject (and the post-training row) in every interval on ONNX
    Runtime against the torch model with that subject's pack applied.

    Raises:
        QPDeployError: packs of another base or other intervals, two packs with one
            identifier, a base with per-interval activation scales (named in the message).
    """
    from qpdeploy.pack import apply_pack, at_strength, post_training_scales, reset_to_post_training
    from qpdeploy.progress import stage
    from qpdeploy.qunet import get_router
    from qpdeploy.token import check_token_record

    from .subjects import tables_for_packs

    start = time.perf_counter()
    check_output(out, force, DEPLOY_ARTIFACT)
    if config.build_engines:
        require_tensorrt()
    if config.layout not in (None, SUBJECTS_LAYOUT):
        raise QPDeployError(f"several scale packs export to the {SUBJECTS_LAYOUT} layout, not {config.layout}")
    # 1. the subjects' tables, and a pack with the most tables installed for tracing
    ptq = post_training_scales(base)
    packs = [(at_strength(pack, ptq, config.pack_strength), where) for pack, where in packs]
    intervals = packs[0][0].intervals if packs else get_router(base.unet).intervals
    tables = tables_for_packs(base.unet, packs, intervals)
    for pack, where in packs:
        apply_pack(base, pack)  # another base fails here
        if pack.token:
            check_token_record(pipe, pack.token, pack.tokens)
    tracer = next((p for p, _ in packs if p.input_scales), packs[0][0] if packs else None)
    if tracer is None:
        reset_to_post_training(base)
    else:
        apply_pack(base, tracer)
    plan = plan_unet(base, SUBJECTS_LAYOUT)
    latent_hw, seq_len, embeds_dim = graph_shapes(pipe, config)
    with atomic_dir(out, force, DEPLOY_ARTIFACT) as tmp, stage("export", _stages(config), show_progress) as advance:
        # 2. the UNet graph (tables as inputs) and the tables file
        unet_files = export_unet(base, SUBJECTS_LAYOUT, tmp, latent_hw, seq_len, config.opset, embeds_dim, plan)
        from .subjects import tables_file_name

        tables_file = tables_file_name(tables)
        tables.save(tmp / tables_file)
        advance()
        # 3-4. the float parts (every subject's pivotal-tuned row in the text encoders), checks
        parts, structure = export_rest(base, pipe, tmp, unet_files, latent_hw, config, [p for p, _ in packs], advance)
        sqnr = None
        if config.verify:
            sqnr = compare_subjects(base, unet_files, tmp, config, tables, packs, intervals)
            advance()
        # 5. engines: the tables get a profile from one row to the room asked for
        engines = None
        max_rows = 1 + config.max_subjects * intervals.k
        if config.build_engines:
            engines = build_engines(tmp, engine_jobs(unet_files, parts, config, latent_hw, tables.rows, max_rows),
                                    config.strongly_typed)
            engines["max_table_rows"] = max_rows
            advance()
        # 6. manifest and report
        reset_to_post_training(base)
        record = manifest_record(base=base, pack=None, pipe=pipe, config=config, unet_files=unet_files, parts=parts,
                                 structure=structure, engines=engines, latent_hw=latent_hw)
        record["intervals"] = intervals.to_json()
        record["unet"]["tables"] = {"file": tables_file, "rows": tables.rows, "input_scales": tables.input_scales,
                                    "inputs": [s.to_json() for s in unet_files.tables]}
        record["subjects"] = [s.to_json() for s in tables.subjects]
        manifest = write_manifest(tmp, record)
        flat = None if sqnr is None else [v for per in sqnr.values() for v in per]
        report = export_report(base, plan, unet_files, manifest, tmp, structure, flat, start)
        report["sqnr_db_per_subject"] = sqnr
        report["subjects"] = [s.identifier for s in tables.subjects]
        write_json(tmp / REPORT_FILE, report)
        advance()
    return Path(out), report


def graph_shapes(pipe, config: ExportConfig) -> tuple[tuple[int, int], int, int | None]:
    """``(latent (h, w), text length, SDXL pooled width or None)`` the graphs are exported for."""
    embeds_dim = pipe.text_encoder_2.config.projection_dim if getattr(pipe, "text_encoder_2", None) else None
    return latent_size(pipe, config), pipe.tokenizer.model_max_length, embeds_dim


def _stages(config: ExportConfig) -> int:
    return 4 + int(config.verify) + int(config.build_engines)


def export_rest(base, pipe, out_dir, unet_files, latent_hw, config: ExportConfig, packs: list, advance):
    """Export the float parts (text encoder(s) with every pivotal-tuned identifier row of
    ``packs`` baked in, VAE decoder, tokenizers, scheduler; the caller's pipeline is left as
    it was), then ``onnx.checker`` and the QDQ rules on every graph. Returns ``(parts, the
    UNet graphs' QDQ structure)``."""
    import contextlib

    from qpdeploy.token import tokens_applied

    with contextlib.ExitStack() as rows:
        for pack in packs:
            if pack.token:
                rows.enter_context(tokens_applied(pipe, pack.token, pack.tokens))
        parts = export_parts(pipe, out_dir, latent_hw, config.opset)
    advance()
    structure = check_unet_graphs(base, unet_files, out_dir)
    for part in parts:
        check_graph(out_dir / part.onnx)
    advance()
    return parts, structure


def compare_subjects(base, unet_files, out_dir, config: ExportConfig, tables, packs, intervals) -> dict[str, list[float]]:
    """ORT-vs-torch SQNR of the multi-subject graph per subject ("" for the post-training
    row) and interval: ORT gets the tables and the subject's row of each interval, torch the
    base with that subject's pack applied.

    Raises:
        QPDeployError: a subject's interval is below ``config.min_sqnr_db``.
    """
    import torch

    from qpdeploy.calibrate import sqnr_db
    from qpdeploy.pack import apply_pack, reset_to_post_training

    from .subjects import pack_identifier
    from .unet import call_unet, example_inputs
    from .verify import ort_session

    session = ort_session(out_dir / unet_files.onnx_files[0])
    feeds_tables = {name: t.numpy() for name, t in tables.tables.items()}
    result = {}
    for pack, where in [(None, None), *packs]:
        identifier = "" if pack is None else pack_identifier(pack, where)
        if pack is None:
            reset_to_post_training(base)
        else:
            apply_pack(base, pack)
        values = tables.selector_values(identifier or None, intervals.k)
        per_interval = []
        for k in range(intervals.k):
            lo, hi = intervals.bounds(k)
            feed = example_inputs(unet_files.inputs, config.batch, seed=config.seed + k, timestep=(lo + hi) / 2,
                                  selector_value=values[k])
            with torch.no_grad():
                expected = call_unet(base.unet.eval(), feed)
            got = session.run(None, {**{n: v.numpy() for n, v in feed.items()}, **feeds_tables})[0]
            db = min(sqnr_db(expected, torch.from_numpy(got)), 300.0)
            if db < config.min_sqnr_db:
                raise QPDeployError(f"ONNX Runtime differs from the torch model for subject {identifier or '(none)'} "
                                    f"in interval {k}: {db:.1f} dB < {config.min_sqnr_db} dB")
            per_interval.append(db)
        result[identifier] = per_interval
    return result


def latent_size(pipe, config: ExportConfig) -> tuple[int, int]:
    """Latent (h, w) for the configured image size (default: the model's resolution)."""
    from qpdeploy.models import check_resolution, native_resolution, vae_factor

    height, width = config.height or native_resolution(pipe), config.width or native_resolution(pipe)
    check_resolution(pipe, height, "height")
    check_resolution(pipe, width, "width")
    return height // vae_factor(pipe), width // vae_factor(pipe)


def check_unet_graphs(base, unet_files, out_dir):
    """``onnx.checker`` and the QDQ rules on every UNet graph; returns the first graph's structure.

    Raises:
        QPDeployError: a graph breaks a QDQ rule or lacks a quantized layer of the base.
    """
    import onnx

    expected = expected_qdq_units(base.unet)
    structure = None
    for name in unet_files.onnx_files:
        check_graph(out_dir / name)
        found = qdq_structure(onnx.load(str(out_dir / name), load_external_data=False))
        if found.violations or found.layers != expected:
            cause = found.violations[0] if found.violations else \
                f"{len(found.layers)} of {len(expected)} quantized layers found"
            raise QPDeployError(f"exported {name} breaks the QDQ rules: {cause}")
        structure = structure or found
    return structure


def compare_unet(base, unet_files, out_dir, config: ExportConfig) -> list[float]:
    """ORT-vs-torch SQNR per interval (see :func:`.verify.compare_with_torch`).

    Raises:
        QPDeployError: an interval is below ``config.min_sqnr_db``.
    """
    sqnr = compare_with_torch(base.unet, [out_dir / f for f in unet_files.onnx_files], unet_files.plan,
                              unet_files.inputs, unet_files.outputs, _router_intervals(base), config.batch,
                              config.seed, config.min_sqnr_db)
    worst = min(sqnr)
    if worst < config.min_sqnr_db:
        raise QPDeployError(f"ONNX Runtime differs from the torch model in interval {sqnr.index(worst)}: "
                            f"{worst:.1f} dB < {config.min_sqnr_db} dB")
    return sqnr


def _router_intervals(base):
    from qpdeploy.qunet import get_router

    return get_router(base.unet).intervals


def engine_jobs(unet_files, parts, config: ExportConfig, latent_hw, rows: int = 1, max_rows: int = 1) -> list[EngineJob]:
    """One engine per graph: UNet graphs fixed at the export shapes (INT8; a multi-subject
    graph's scale tables from 1 to ``max_rows`` rows, optimized for ``rows``), the float
    parts with batch 1..config.batch."""
    jobs = []
    for graph, onnx_file in zip(unet_files.plan.graphs, unet_files.onnx_files):
        shapes = {s.name: _shape(s, config.batch) for s in unet_files.inputs}
        profile = {k: (v, v, v) for k, v in shapes.items()}
        for spec in unet_files.tables:
            tail = tuple(spec.shape[1:])
            profile[spec.name] = ((1, *tail), (min(rows, max_rows), *tail), (max_rows, *tail))
        jobs.append(EngineJob(onnx_file, f"{graph.name}.plan", True, profile))
    for part in parts:
        profile = {s.name: (_shape(s, 1), _shape(s, 1), _shape(s, config.batch)) for s in part.inputs}
        jobs.append(EngineJob(part.onnx, f"{part.name}.plan", False, profile))
    return jobs


def _shape(spec, batch: int) -> tuple[int, ...]:
    return tuple(batch if d == "batch" else d for d in spec.shape)


def manifest_record(*, base, pack, pipe, config, unet_files, parts, structure, engines, latent_hw) -> dict:
    """Everything the manifest holds but the files table (see :mod:`.manifest`); read back
    through the typed :class:`~qpdeploy.exporters.manifest.DeployManifest`."""
    from qpdeploy import __version__
    from qpdeploy.models import model_family, model_sampling_defaults
    from qpdeploy.qunet import get_router

    plan: UNetPlan = unet_files.plan
    router = get_router(base.unet)
    built = engines is not None
    graphs = [{"name": g.name, "onnx": f, "intervals": list(g.intervals), "engine": f"{g.name}.plan" if built else None}
              for g, f in zip(plan.graphs, unet_files.onnx_files)]
    selector = None if plan.selector is None else {"input": plan.selector, "values": list(plan.selector_values)}
    spec = lambda specs: [s.to_json() for s in specs]  # noqa: E731
    part_records = {p.name: {"name": p.name, "onnx": p.onnx, "engine": f"{p.name}.plan" if built else None,
                             "inputs": spec(p.inputs), "outputs": spec(p.outputs), **p.extra} for p in parts}
    height, width = (n * pipe.vae_scale_factor for n in latent_hw)
    return {
        "qpdeploy_version": __version__,
        "base_hash": base.base_hash,
        "pack_hash": None if pack is None else pack_hash(pack),
        "strategy": None if pack is None else pack.strategy,
        "intervals": router.intervals.to_json(),
        "s1_intervals": [] if pack is None else list(pack.s1_intervals),
        "family": model_family(base.unet),
        "pipeline": pipeline_record(pipe),
        "height": height,
        "width": width,
        "batch": config.batch,
        "vae_scale_factor": pipe.vae_scale_factor,
        "opset": config.opset,
        "export": config.to_json(),
        "unet": {
            "layout": plan.layout, "graphs": graphs, "graph_of_interval": list(plan.graph_of_interval),
            "selector": selector, "weights_file": unet_files.weights_file,
            "inputs": spec(unet_files.inputs), "outputs": spec(unet_files.outputs),
            "config": _jsonable(dict(base.unet.config)), "qdq_layers": len(structure.layers),
            "weight_bits": base.config.weight_bits, "act_bits": base.config.act_bits,
            "act_scales": base.config.act_scales,
        },
        "text_encoders": [r for name, r in part_records.items() if name.startswith("text_encoder")],
        "vae_decoder": part_records["vae_decoder"],
        "scheduler": "scheduler",
        "engines": None if not built else {**engines, "batch": config.batch, "height": height, "width": width},
        "sampling": model_sampling_defaults(pipe),
    }


def _jsonable(config: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}


def export_report(base, plan, unet_files, manifest, out_dir, structure, sqnr, start) -> dict:
    """report.json: the issue's keys plus per-interval SQNR and the byte breakdown.

    ``deploy_bytes_if_unshared``: the deploy dir's size if each of the distinct per-interval
    graphs this pack needs were an independent graph with its own copy of the weights
    (K independent graphs); for a table layout, K graphs of its graph's size replace it.
    """
    total = dir_bytes(out_dir)  # manifest.json included; report.json is written after
    independent = len(plan_unet(base, "per-interval").graphs)
    graph_bytes = sum(manifest["files"][f]["bytes"] for f in unet_files.onnx_files) / len(unet_files.onnx_files)
    unshared = total + (independent - 1) * unet_files.weights_bytes \
        + round((independent - len(unet_files.onnx_files)) * graph_bytes)
    return {
        "layout": plan.layout,
        "graphs": len(plan.graphs),
        "qdq_layers": len(structure.layers),
        "min_sqnr_db_vs_torch": None if sqnr is None else min(sqnr),
        "deploy_bytes": total,
        "deploy_bytes_if_unshared": unshared,
        "seconds": time.perf_counter() - start,
        "sqnr_db_per_interval": sqnr,
        "graph_of_interval": list(plan.graph_of_interval),
        "unet_weights_bytes": unet_files.weights_bytes,
        "independent_graphs": independent,
        "engines_built": manifest["engines"] is not None,
    }


def print_export_summary(report: dict) -> None:
    """A short table: layout, graphs, Q/DQ layers, SQNR vs torch per interval, bytes, time."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="deploy dir", show_header=False)
    table.add_row("layout / UNet graphs", f"{report['layout']} / {report['graphs']}")
    table.add_row("layers with Q/DQ", str(report["qdq_layers"]))
    if report["sqnr_db_per_interval"] is not None:
        table.add_row("min SQNR ORT vs torch", f"{report['min_sqnr_db_vs_torch']:.1f} dB")
        for k, value in enumerate(report["sqnr_db_per_interval"]):
            table.add_row(f"  interval {k} (graph {report['graph_of_interval'][k]})", f"{value:.1f} dB")
    table.add_row("deploy bytes (shared weights)", f"{report['deploy_bytes'] / 2**20:.2f} MiB")
    table.add_row(f"if {report['independent_graphs']} independent graphs",
                  f"{report['deploy_bytes_if_unshared'] / 2**20:.2f} MiB")
    table.add_row("engines", "built" if report["engines_built"] else "not built (--build-engines)")
    table.add_row("seconds", f"{report['seconds']:.1f}")
    Console().print(table)

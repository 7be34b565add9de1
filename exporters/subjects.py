"""Many subjects in one INT8 UNet graph: the ``multi-subject`` layout and its scale tables.

A scale pack changes only per-channel constants of a model whose integer weights never change
(docs/design.md, "The quantized layer"), and a quantized layer already picks its scale row per
sample. So one UNet graph can serve every subject of a deploy dir, and one call can mix
subjects and denoising steps:

- the graph is the table form of :mod:`.qdq` (``w_scale = s_ptq``, the integer conv's output
  multiplied by a gathered row of ``s_out / s_ptq``, optional ``s_in`` rows), but the tables
  are **graph inputs** with a dynamic first dimension ``rows`` instead of initializers;
- the tables live in one small file, ``subjects-<hash>.safetensors`` (one tensor per table input,
  plus each layer's ``s_ptq`` as ``reference.<layer>``, which is what turns a pack's ``s_out``
  into ratio rows without the base); the runtime feeds them with every call;
- row 0 is the post-training scales; each subject owns the rows ``first_row ..
  first_row + sets - 1``, and its ``rows_of_interval[k]`` is what the per-sample ``expert``
  input gets in interval k (0 where its strategy uses the post-training scales).

Adding or removing a subject rewrites only the tables file and the manifest: the UNet graph
and ``unet.weights`` stay byte for byte (and so does an engine built with room for the rows).
Subjects share one base and one interval partition; each keeps its own strategy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from qpdeploy.errors import QPDeployError

from .qdq import OUT_RATIO_TABLE, S_IN_TABLE, _table_shape

LAYOUT = "multi-subject"
TABLES_KIND = "qpdeploy.subject-tables"
REFERENCE_PREFIX = "reference."
POST_TRAINING_ROW = 0
ROWS_DIM = "rows"
TABLE_KEYS = (OUT_RATIO_TABLE, S_IN_TABLE)


def is_table_input(name: str) -> bool:
    """Whether a UNet graph input name is a per-layer scale table."""
    return name.rsplit(".", 1)[-1] in TABLE_KEYS


@dataclass(frozen=True)
class SubjectRecord:
    """One subject of a multi-subject deploy dir (its entry in the manifest's ``subjects``)."""

    identifier: str
    pack_hash: str
    strategy: str
    s1_intervals: tuple[int, ...]
    first_row: int
    sets: int
    rows_of_interval: tuple[int, ...]
    input_scales: bool
    prompt: str | None = None
    class_prompt: str | None = None

    def to_json(self) -> dict:
        return {"identifier": self.identifier, "pack_hash": self.pack_hash, "strategy": self.strategy,
                "s1_intervals": list(self.s1_intervals), "first_row": self.first_row, "sets": self.sets,
                "rows_of_interval": list(self.rows_of_interval), "input_scales": self.input_scales,
                "prompt": self.prompt, "class_prompt": self.class_prompt}

    @classmethod
    def from_json(cls, data: dict) -> "SubjectRecord":
        return cls(data["identifier"], data["pack_hash"], data["strategy"], tuple(data["s1_intervals"]),
                   data["first_row"], data["sets"], tuple(data["rows_of_interval"]), data["input_scales"],
                   data.get("prompt"), data.get("class_prompt"))

    def shifted(self, by: int) -> "SubjectRecord":
        """The same subject with its rows moved by ``by`` (a subject before it was removed)."""
        return replace(self, first_row=self.first_row + by,
                       rows_of_interval=tuple(r + by if r != POST_TRAINING_ROW else r for r in self.rows_of_interval))


def pack_identifier(pack, where) -> str:
    """The identifier word a pack was trained with (its ``pack.json``)."""
    identifier = pack.meta.get("identifier")
    if not isinstance(identifier, str) or not identifier:
        raise QPDeployError(f"scale pack {where} records no identifier word; a multi-subject deploy dir names its "
                            "subjects by it (train with --identifier)")
    return identifier


@dataclass(frozen=True)
class SubjectTables:
    """The scale tables of a multi-subject UNet graph and the subjects that own their rows.

    Attributes:
        tables: graph input name (``<layer>.out_ratio_table`` / ``<layer>.s_in_table``) ->
            float32 (rows, C, 1, 1) for convolutions or (rows, 1, C) for linear layers.
        references: quantized layer name -> its post-training scale ``s_ptq`` (C_out,).
        subjects: in row order.
        input_scales: whether the graph has ``s_in`` tables (packs with input scales fit).
    """

    tables: dict[str, torch.Tensor]
    references: dict[str, torch.Tensor]
    subjects: tuple[SubjectRecord, ...] = ()
    input_scales: bool = False

    @property
    def rows(self) -> int:
        return 1 + sum(s.sets for s in self.subjects)

    def subject(self, identifier: str) -> SubjectRecord:
        """The subject named ``identifier``.

        Raises:
            QPDeployError: naming the subjects there are.
        """
        for record in self.subjects:
            if record.identifier == identifier:
                return record
        known = ", ".join(s.identifier for s in self.subjects) or "none"
        raise QPDeployError(f"no subject {identifier!r} in this deploy dir (subjects: {known})")

    def with_subject(self, pack, where, intervals) -> "SubjectTables":
        """These tables with ``pack``'s scale sets appended as a new subject.

        Raises:
            QPDeployError: the pack's layers, intervals or input scales do not fit, or its
                identifier is taken (each named with ``where``).
        """
        from qpdeploy.pack import pack_hash

        identifier = pack_identifier(pack, where)
        if any(s.identifier == identifier for s in self.subjects):
            raise QPDeployError(f"subject {identifier!r} is already in this deploy dir (scale pack {where})")
        if pack.intervals != intervals:
            raise QPDeployError(f"scale pack {where} was trained on intervals {pack.intervals}; the subjects of this "
                                f"deploy dir share {intervals}")
        if pack.input_scales and not self.input_scales:
            raise QPDeployError(f"scale pack {where} trains input-channel scales, and this deploy dir's graph has no "
                                "input-scale tables; export the subjects again with this pack among them")
        layers = {key.rsplit(".", 1)[0] for key in pack.scales}
        if layers != set(self.references):
            extra = sorted(layers ^ set(self.references))
            raise QPDeployError(f"scale pack {where} does not fit this deploy dir's layers (for example {extra[0]})")
        sets, first = pack.num_sets, self.rows
        tables = dict(self.tables)
        for layer, reference in self.references.items():
            out_name = f"{layer}.{OUT_RATIO_TABLE}"
            # s_out / s_ptq in float32: the same operation as QuantLayer.out_ratio_table
            ratio = pack.scales[f"{layer}.s_out"].float() / reference
            tables[out_name] = torch.cat([tables[out_name], ratio.reshape(sets, *tables[out_name].shape[1:])])
            if self.input_scales:
                in_name = f"{layer}.{S_IN_TABLE}"
                table = tables[in_name]
                s_in = pack.scales.get(f"{layer}.s_in")
                rows = torch.ones(sets, table[0].numel()) if s_in is None else s_in.float()
                tables[in_name] = torch.cat([table, rows.reshape(sets, *table.shape[1:])])
        record = SubjectRecord(
            identifier, pack_hash(pack), pack.strategy, pack.s1_intervals, first, sets,
            tuple(first + e if e < sets else POST_TRAINING_ROW for e in pack.set_of_interval),
            pack.input_scales, pack.meta.get("prompt"), pack.meta.get("class_prompt"))
        return replace(self, tables=tables, subjects=(*self.subjects, record))

    def without_subject(self, identifier: str) -> "SubjectTables":
        """These tables without subject ``identifier``'s rows (later subjects move up)."""
        gone = self.subject(identifier)
        keep = torch.ones(self.rows, dtype=torch.bool)
        keep[gone.first_row:gone.first_row + gone.sets] = False
        tables = {name: table[keep] for name, table in self.tables.items()}
        subjects = tuple(s if s.first_row < gone.first_row else s.shifted(-gone.sets)
                         for s in self.subjects if s.identifier != identifier)
        return replace(self, tables=tables, subjects=subjects)

    def selector_values(self, identifier: str | None, k: int) -> tuple[int, ...]:
        """The ``expert`` value for each of the K intervals: the subject's rows, or row 0
        (post-training scales) without a subject."""
        if identifier is None:
            return (POST_TRAINING_ROW,) * k
        return self.subject(identifier).rows_of_interval

    # -- files --------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the tables file (tables and references; the subjects go in the manifest)."""
        from safetensors.torch import save_file

        tensors = {name: t.contiguous() for name, t in self.tables.items()}
        tensors.update({REFERENCE_PREFIX + layer: r.contiguous() for layer, r in self.references.items()})
        save_file(tensors, str(path), metadata={"kind": TABLES_KIND})

    @classmethod
    def load(cls, path, subjects: list[dict], input_scales: bool) -> "SubjectTables":
        """Read a tables file and check that its rows are the ones ``subjects`` own."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise QPDeployError(f"cannot read {path}: {exc}") from exc
        references = {k[len(REFERENCE_PREFIX):]: v for k, v in tensors.items() if k.startswith(REFERENCE_PREFIX)}
        tables = {k: v for k, v in tensors.items() if not k.startswith(REFERENCE_PREFIX)}
        result = cls(tables, references, tuple(SubjectRecord.from_json(s) for s in subjects), input_scales)
        wrong = [name for name, t in tables.items() if t.shape[0] != result.rows]
        if wrong or not references:
            raise QPDeployError(f"{path} does not hold the {result.rows} scale rows its manifest lists "
                                f"({wrong[0] if wrong else 'no reference scales'})")
        return result


def empty_tables(unet, input_scales: bool) -> SubjectTables:
    """Tables holding only row 0 (post-training scales) for every quantized layer of ``unet``."""
    from qpdeploy.layers import quant_layers

    tables, references = {}, {}
    for name, layer in quant_layers(unet):
        references[name] = layer.s_ptq.detach().float().clone()
        tables[f"{name}.{OUT_RATIO_TABLE}"] = _table_shape(layer, torch.ones(1, layer.out_features))
        if input_scales:
            tables[f"{name}.{S_IN_TABLE}"] = _table_shape(layer, torch.ones(1, layer.in_features))
    return SubjectTables(tables, references, (), input_scales)


def tables_for_packs(unet, packs: list[tuple[object, str]], intervals) -> SubjectTables:
    """The tables of the given ``(pack, where)`` subjects, in order."""
    tables = empty_tables(unet, any(pack.input_scales for pack, _ in packs))
    for pack, where in packs:
        tables = tables.with_subject(pack, where, intervals)
    return tables


# ------------------------------------------------------------------------------------
# Adding and removing subjects of a deploy dir, in place
# ------------------------------------------------------------------------------------

def add_subject(deploy, pack_dir, force: bool = False) -> dict:
    """Add the subject of scale pack ``pack_dir`` to a multi-subject deploy dir.

    Only the tables file and the manifest change; the UNet graph, its weights and any
    engine are left as they are. With ``force`` a subject of the same identifier is
    replaced. Returns the new subject's manifest record.

    Raises:
        QPDeployError: not a multi-subject deploy dir, a pack of another base or intervals,
            an identifier already there (without ``force``), a pivotal-tuned pack (its
            identifier row would need the text encoder exported again), or no room left in
            the built engines.
    """
    from qpdeploy.pack import at_strength, load_pack

    trained = load_pack(pack_dir)

    def change(manifest, tables: SubjectTables) -> SubjectTables:
        base_hash, _ = manifest.hashes
        if trained.base_hash != base_hash:
            raise QPDeployError(f"scale pack {pack_dir} belongs to base {trained.base_hash[:12]}, not to this deploy "
                                f"dir's base {base_hash[:12]}")
        pack = at_strength(trained, tables.references, manifest.pack_strength)  # as every subject here
        if pack.token:
            raise QPDeployError(f"scale pack {pack_dir} was trained with --train-token: its identifier's embedding "
                                "lives in the text encoder, which add-subject does not re-export; export the "
                                "subjects again with this pack among them")
        identifier = pack_identifier(pack, pack_dir)
        if force and any(s.identifier == identifier for s in tables.subjects):
            tables = tables.without_subject(identifier)
        return tables.with_subject(pack, pack_dir, manifest.intervals)

    tables = _rewrite(deploy, change)
    return tables.subjects[-1].to_json()


def remove_subject(deploy, identifier: str) -> None:
    """Remove subject ``identifier`` from a multi-subject deploy dir (tables and manifest only)."""
    _rewrite(deploy, lambda manifest, tables: tables.without_subject(identifier))


def _rewrite(deploy, change) -> SubjectTables:
    """Apply ``change(manifest, tables) -> tables`` to a deploy dir under its write lock.

    The new tables go to a new file (``subjects-<hash>.safetensors``); then manifest.json is
    replaced atomically; then the old file is removed. A crash at any point leaves a deploy
    dir whose manifest and files agree (at worst an unlisted stray file, which the runtime
    never opens).
    """
    from qpdeploy.io import OutputClaim, file_sha256, write_file_atomic, write_json

    from .manifest import MANIFEST_FILE, read_manifest

    deploy = Path(os.path.abspath(deploy))
    claim = OutputClaim(deploy)
    claim.acquire()
    try:
        # only the tables file is read (and replaced): hashing it is enough, the graph and the
        # weights keep their entries, so any damage to them is still caught when they load
        manifest = read_manifest(deploy)
        if manifest.layout != LAYOUT:
            raise QPDeployError(f"deploy dir {deploy} has the {manifest.layout} layout; subjects are added to a "
                                f"{LAYOUT} deploy dir (qpdeploy export with --layout {LAYOUT})")
        manifest.verify_file(manifest.unet["tables"]["file"])
        old = load_tables(manifest)
        new = change(manifest, old)
        capacity = (manifest.engines or {}).get("max_table_rows")
        if capacity is not None and new.rows > capacity:
            raise QPDeployError(f"the TensorRT engines of {deploy} were built for at most {capacity} scale rows and the "
                                f"subjects need {new.rows}; export again with a larger --max-subjects")
        record = manifest.unet["tables"]
        name = tables_file_name(new)
        path = deploy / name
        write_file_atomic(path, new.save)
        data = dict(manifest.data)
        files = {k: v for k, v in data["files"].items() if k != record["file"]}
        files[name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        data["files"] = files
        data["subjects"] = [s.to_json() for s in new.subjects]
        data["unet"] = {**data["unet"], "tables": {**record, "file": name, "rows": new.rows}}
        write_file_atomic(deploy / MANIFEST_FILE, lambda tmp: write_json(tmp, data))
        if name != record["file"]:
            (deploy / record["file"]).unlink(missing_ok=True)
        _update_report(deploy, new)
        return new
    finally:
        claim.release()


def _update_report(deploy: Path, tables: SubjectTables) -> None:
    """Keep report.json's subject list current; a subject added later has no export-time
    ORT-vs-torch figure (its rows are computed exactly as export computes them)."""
    from qpdeploy.io import read_json, write_file_atomic, write_json

    from .manifest import REPORT_FILE

    path = deploy / REPORT_FILE
    if not path.is_file():
        return
    report = read_json(path)
    report["subjects"] = [s.identifier for s in tables.subjects]
    measured = report.get("sqnr_db_per_subject") or {}
    report["sqnr_db_per_subject"] = {k: measured.get(k) for k in ["", *report["subjects"]]}
    write_file_atomic(path, lambda tmp: write_json(tmp, report))


def tables_file_name(tables: SubjectTables) -> str:
    """``subjects-<content hash>.safetensors``: a new name for every new content, so that a
    rewrite never overwrites the file the current manifest lists."""
    from qpdeploy.io import tensors_hash

    return f"subjects-{tensors_hash(tables.tables)[:12]}.safetensors"


def load_tables(manifest) -> SubjectTables:
    """The scale tables of a multi-subject deploy dir (its listed, size-checked tables file)."""
    record = manifest.unet["tables"]
    return SubjectTables.load(manifest.file(record["file"]), manifest.data["subjects"], record["input_scales"])

"""Shapes of the artifacts' JSON headers, checked in one place when an artifact is read.

A header that was edited by hand, truncated or written by something else gets a one-line
:class:`~qpdeploy.errors.QPDeployError` naming the file and the key (``unet.graphs[1].onnx``)
instead of a ``KeyError`` or ``TypeError`` deep inside a loader. Only the keys qpdeploy reads
are described; other keys are allowed (a pack keeps its training settings beside them).

A spec maps each key to a :class:`Field`: the JSON types it may have, whether it may be
missing, and for objects and arrays the spec of what they hold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import QPDeployError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "an object",
          list: "an array", type(None): "null"}


@dataclass(frozen=True)
class Field:
    """What one JSON value may be.

    Attributes:
        types: accepted Python types of the parsed value (``float`` accepts integers too;
            ``int`` never accepts booleans).
        optional: the key may be missing.
        keys: for objects, the spec of their keys.
        items: for arrays, the field every element must match.
        check: an extra test of the value and the words for what it must be.
    """

    types: tuple
    optional: bool = False
    keys: dict | None = None
    items: "Field | None" = None
    check: tuple | None = None  # (predicate, description)


def f(*types, optional=False, keys=None, items=None, check=None) -> Field:
    """Shorthand for :class:`Field`."""
    return Field(tuple(types), optional, keys, items, check)


def _is(value, types) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, tuple(t for t in types if t is not bool))


def validate(data, spec: dict, where: str | Path, prefix: str = "") -> None:
    """Check ``data`` (a parsed JSON object) against ``spec``.

    Raises:
        QPDeployError: ``<where>: <key> must be <what>, got <value>`` for the first mismatch.
    """
    if not isinstance(data, dict):
        raise QPDeployError(f"{where}: {prefix.rstrip('.') or 'the file'} must be an object, got {_show(data)}")
    for key, want in spec.items():
        if key not in data:
            if not want.optional:
                raise QPDeployError(f"{where}: {prefix}{key} is missing")
            continue
        _check_value(data[key], want, where, f"{prefix}{key}")


def _check_value(value, want: Field, where, name: str) -> None:
    if not _is(value, want.types):
        expected = " or ".join(_NAMES.get(t, t.__name__) for t in want.types)
        raise QPDeployError(f"{where}: {name} must be {expected}, got {_show(value)}")
    if want.check is not None and value is not None and not want.check[0](value):
        raise QPDeployError(f"{where}: {name} must be {want.check[1]}, got {_show(value)}")
    if want.keys is not None and isinstance(value, dict):
        validate(value, want.keys, where, f"{name}.")
    if want.items is not None and isinstance(value, list):
        for i, item in enumerate(value):
            _check_value(item, want.items, where, f"{name}[{i}]")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------

SHA256 = f(str, check=(lambda v: bool(_SHA256.match(v)), "a SHA-256 hex digest"))
COUNT = f(int, check=(lambda v: v >= 0, "a non-negative integer"))
INTERVALS = f(dict, keys={"boundaries": f(list, items=f(int))})
INDEX_LIST = f(list, items=COUNT)


def relative_path(value: str) -> bool:
    """A path that stays inside the folder it is relative to: not absolute, no ``..``, no
    backslashes or empty parts (the same on every system)."""
    if not value or "\\" in value or "\x00" in value or value.startswith("/"):
        return False
    parts = value.split("/")
    return all(p not in ("", ".", "..") for p in parts)


PATH = f(str, check=(relative_path, "a relative path inside the artifact (no '/' at the start, no '..')"))
OPTIONAL_PATH = f(str, type(None), check=PATH.check)

HEADER = {"format_version": f(int), "kind": f(str)}

BASE = {
    **HEADER,
    "base_hash": SHA256,
    "weights_sha256": SHA256,
    "quantize": f(dict),
    "intervals": INTERVALS,
    "unet_config": f(dict),
    "layers": f(list, items=f(dict, keys={"name": f(str), "kind": f(str), "split": f(int, type(None))})),
    "skipped": f(list, items=f(str)),
    "source": f(dict, keys={"kind": f(str), "name": f(str, optional=True), "path": f(str, optional=True)}),
    "source_hash": SHA256,
}

PACK = {
    **HEADER,
    "strategy": f(str),
    "intervals": INTERVALS,
    "s1_intervals": INDEX_LIST,
    "num_sets": COUNT,
    "input_scales": f(bool),
    "base_hash": SHA256,
    "scales_sha256": SHA256,
    "token": f(dict, optional=True, keys={"identifier": f(str), "ids": f(dict)}),  # pivotal tuning
}

TENSOR_SPEC = f(dict, keys={"name": f(str), "dtype": f(str), "shape": f(list, items=f(int, str))})
PART = {
    "name": f(str),
    "onnx": PATH,
    "engine": OPTIONAL_PATH,
    "inputs": f(list, items=TENSOR_SPEC),
    "outputs": f(list, items=TENSOR_SPEC),
}
MANIFEST = {
    **HEADER,
    "base_hash": SHA256,
    "pack_hash": f(str, type(None), check=SHA256.check),
    "strategy": f(str, type(None)),
    "intervals": INTERVALS,
    "s1_intervals": INDEX_LIST,
    "pipeline": f(dict, keys={"class": f(str), "config": f(dict)}),
    "height": COUNT,
    "width": COUNT,
    "batch": COUNT,
    "vae_scale_factor": COUNT,
    "unet": f(dict, keys={
        "layout": f(str),
        "graphs": f(list, items=f(dict, keys={"name": f(str), "onnx": PATH, "intervals": INDEX_LIST,
                                              "engine": OPTIONAL_PATH})),
        "graph_of_interval": INDEX_LIST,
        "selector": f(dict, type(None), keys={"input": f(str), "values": f(list, items=f(int))}),
        "weights_file": OPTIONAL_PATH,
        "inputs": f(list, items=TENSOR_SPEC),
        "outputs": f(list, items=TENSOR_SPEC),
        "config": f(dict),
    }),
    "text_encoders": f(list, items=f(dict, keys={**PART, "tokenizer": PATH})),
    "vae_decoder": f(dict, keys={**PART, "scaling_factor": f(float), "shift_factor": f(float, type(None)),
                                 "config": f(dict, optional=True)}),
    "scheduler": PATH,
    "engines": f(dict, type(None)),
    "sampling": f(dict, optional=True),  # the model's recommended guidance / steps
    "subjects": f(list, optional=True, items=f(dict)),  # multi-subject layout (SUBJECT each)
    "files": f(dict),
}
FILE_RECORD = {"bytes": COUNT, "sha256": SHA256}
SUBJECT_TABLES = {"file": PATH, "rows": COUNT, "input_scales": f(bool), "inputs": f(list, items=TENSOR_SPEC)}
SUBJECT = {  # one subject of a multi-subject deploy dir (exporters.subjects.SubjectRecord)
    "identifier": f(str),
    "pack_hash": SHA256,
    "strategy": f(str),
    "s1_intervals": INDEX_LIST,
    "first_row": COUNT,
    "sets": COUNT,
    "rows_of_interval": INDEX_LIST,
    "input_scales": f(bool),
    "prompt": f(str, type(None), optional=True),
    "class_prompt": f(str, type(None), optional=True),
}

"""Trajectories as parquet rows: the schema is derived from the dataclasses of ``agentenv.types``
(``Trajectory``, its ``Step``s as a list of structs), so a field added there is stored too.

Types: ``int`` int32, ``float`` float64, a list of floats float32 (per-token log-probabilities),
``str`` and enums string, ``dict``/``Any`` a JSON string, a list of dataclasses a list of structs.
The layout of older runs is kept: ``policy_version`` is int64, the step count (``num_steps``,
derived) comes before ``final_screenshot`` and the steps come last.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import types
import typing
from typing import Any, Union

import pyarrow as pa

from agentenv.types import Trajectory

_WIDE = {"policy_version": pa.int64()}                      # a counter that grows for the life of a run
_DERIVED = {"num_steps": ("final_screenshot", pa.int32())}  # column: (the column it precedes, type)
_SCALAR = {bool: pa.bool_(), int: pa.int32(), float: pa.float64(), str: pa.string()}


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return tp, False


def _is_json(tp: Any) -> bool:
    return tp is Any or tp is dict or typing.get_origin(tp) is dict


def _item(tp: Any) -> Any:
    """The dataclass a ``list[...]`` field holds, else None."""
    args = typing.get_args(tp) if typing.get_origin(tp) is list else ()
    return args[0] if args and dataclasses.is_dataclass(args[0]) else None


def arrow_type(tp: Any) -> pa.DataType:
    tp, _ = _strip_optional(tp)
    if _is_json(tp) or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        return pa.string()
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if dataclasses.is_dataclass(item):
            return pa.list_(struct_of(item))
        return pa.list_(pa.float32() if item is float else arrow_type(item))
    if tp in _SCALAR:
        return _SCALAR[tp]
    raise TypeError(f"no parquet type for {tp!r}: add it to agentenv.rollout.rows")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _columns(cls: type) -> list[tuple[str, pa.DataType]]:
    return [(f.name, _WIDE.get(f.name) or arrow_type(_hints(cls)[f.name])) for f in dataclasses.fields(cls)]


def struct_of(cls: type) -> pa.StructType:
    return pa.struct(_columns(cls))


def schema_of(cls: type) -> pa.Schema:
    cols = [c for c in _columns(cls) if not _item(_hints(cls)[c[0]])]
    for name, (before, typ) in _DERIVED.items():
        cols.insert(next(i for i, c in enumerate(cols) if c[0] == before), (name, typ))
    return pa.schema(cols + [c for c in _columns(cls) if _item(_hints(cls)[c[0]])])


SCHEMA = schema_of(Trajectory)


def _encode(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v, tp = getattr(obj, f.name), _strip_optional(_hints(type(obj))[f.name])[0]
        if _item(tp):
            v = [_encode(x) for x in v]
        elif _is_json(tp):
            v = None if v is None else json.dumps(v)
        elif isinstance(v, enum.Enum):
            v = v.value
        out[f.name] = v
    return out


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]


def _decode(cls: type, row: dict[str, Any]) -> Any:
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        v = row.get(f.name)
        tp, optional = _strip_optional(_hints(cls)[f.name])
        if (item := _item(tp)) is not None:
            v = [_decode(item, x) for x in v or []]
        elif _is_json(tp):
            v = json.loads(v) if v else _default(f)
        elif v is None and not optional:
            v = _default(f)   # a null written for a field that has a value (older rows)
        elif isinstance(tp, type) and issubclass(tp, enum.Enum):
            v = tp(v)
        kw[f.name] = v
    return cls(**kw)


def to_row(t: Trajectory) -> dict[str, Any]:
    return {**_encode(t), "num_steps": len(t.steps)}


def from_row(r: dict[str, Any]) -> Trajectory:
    return _decode(Trajectory, r)


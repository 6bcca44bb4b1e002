"""The per-layer tensors of `ember_cpu.decode_layers`, from the schema the C++ reads too.

decode_schema.h lists one decoder layer's tensors in the order the op takes them, each with
its kind and its shape in the model's dims; decode.cpp expands the same list into the slots
it indexes and the checks it runs. Here it is parsed into `LAYER_SCHEMA`, and
`LayerTensors` builds a layer's flat list from named parts, checking each part's dtype, shape
and contiguity against its entry first: a model change that misaligns Python and C++ fails
on the tensor's name, in either.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

SCHEMA_FILE = Path(__file__).with_name("decode_schema.h")
# Tensors an entry takes in the flat list, by kind (decode.cpp's kWidth*).
WIDTHS = {"NORM": 1, "PROJ": 4, "EXTRA": 1}
DIM_NAMES = ("hidden", "head_dim", "q_size", "kv_size", "inter")
_ENTRY = re.compile(r"^EMBER_LAYER_TENSOR\((\w+), (NORM|PROJ|EXTRA), ([^,]+), ([^,)]+)\)$")
_EXPRESSION = re.compile(r"^[\w\s+*()]+$")


class SchemaError(ValueError):
    """A layer's tensors do not match the schema (a wrong dtype, shape, layout or order)."""


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # NORM, PROJ or EXTRA
    rows: str  # expressions over DIM_NAMES
    cols: str

    @property
    def width(self) -> int:
        return WIDTHS[self.kind]


def _evaluate(expression: str, dims: dict[str, int]) -> int:
    """An entry's shape expression (names of `dims`, integers, + and *) at `dims`."""
    return int(eval(expression, {"__builtins__": {}}, dims))  # checked by `parse_schema`


def parse_schema(text: str) -> tuple[Entry, ...]:
    entries = []
    for line in text.splitlines():
        if not line.startswith("EMBER_LAYER_TENSOR("):
            continue
        match = _ENTRY.match(line.strip())
        if match is None:
            raise SchemaError(f"decode_schema.h: an entry this parser does not read: {line!r}")
        entry = Entry(*(group.strip() for group in match.groups()))
        for expression in (entry.rows, entry.cols):
            names = set(re.findall(r"[A-Za-z_]\w*", expression))
            if not _EXPRESSION.match(expression) or not names <= set(DIM_NAMES):
                raise SchemaError(f"decode_schema.h: {entry.name}'s shape {expression!r} is "
                                  f"not an expression over {DIM_NAMES}")
        entries.append(entry)
    if len({e.name for e in entries}) != len(entries):
        raise SchemaError("decode_schema.h: a name appears twice")
    return tuple(entries)


LAYER_SCHEMA = parse_schema(SCHEMA_FILE.read_text())
PER_LAYER = sum(e.width for e in LAYER_SCHEMA)  # tensors a layer in decode_layers' params


@dataclass(frozen=True)
class ModelDims:
    """The dims the schema's shapes are written in."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int

    def names(self) -> dict[str, int]:
        return {"hidden": self.hidden, "head_dim": self.head_dim,
                "q_size": self.heads * self.head_dim, "kv_size": self.kv_heads * self.head_dim,
                "inter": self.inter}


@dataclass(frozen=True)
class Projection:
    """A projection as decode_layers takes it: its 4 tensors (by layout, see decode.cpp's
    `project`; empty tensors where the layout has fewer) and the [out, in] weight they hold."""

    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    out_features: int
    in_features: int


Part = torch.Tensor | Projection


@dataclass
class LayerTensors:
    """One layer's parts by schema name: a `Projection` for each PROJ entry, a tensor for
    each NORM entry, a tensor (empty where the family has none) for each EXTRA entry."""

    parts: dict[str, Part]

    def flat(self, layer: int, dims: ModelDims, dtype: torch.dtype) -> list[torch.Tensor]:
        """The layer's `PER_LAYER` tensors in the schema's order, each part checked against its
        entry (a `SchemaError` naming it otherwise)."""
        names = dims.names()
        unknown = set(self.parts) - {e.name for e in LAYER_SCHEMA}
        if unknown:
            raise SchemaError(f"layer {layer}: {sorted(unknown)} are not in decode_schema.h")
        out: list[torch.Tensor] = []
        for entry in LAYER_SCHEMA:
            where = f"decode_layers: layer {layer}'s {entry.name}"
            if entry.name not in self.parts:
                raise SchemaError(f"{where} is missing")
            part = self.parts[entry.name]
            rows = _evaluate(entry.rows, names)
            if entry.kind == "PROJ":
                if not isinstance(part, Projection):
                    raise SchemaError(f"{where} must be a Projection, got {type(part).__name__}")
                cols = _evaluate(entry.cols, names)
                if (part.out_features, part.in_features) != (rows, cols):
                    raise SchemaError(
                        f"{where} must be a [{entry.rows}, {entry.cols}] = [{rows}, {cols}] "
                        f"projection, got [{part.out_features}, {part.in_features}]")
                if len(part.tensors) != entry.width:
                    raise SchemaError(f"{where}: {entry.width} tensors, got {len(part.tensors)}")
                for i, t in enumerate(part.tensors):
                    if not t.is_contiguous():
                        raise SchemaError(f"{where}'s tensor {i} must be contiguous")
                out += part.tensors
                continue
            if not isinstance(part, torch.Tensor):
                raise SchemaError(f"{where} must be a tensor, got {type(part).__name__}")
            empty_ok = entry.kind == "EXTRA" and part.numel() == 0
            if not empty_ok and (part.dtype != dtype or part.shape != (rows,) or
                                 not part.is_contiguous()):
                raise SchemaError(
                    f"{where} must be {'empty or ' if entry.kind == 'EXTRA' else ''}a "
                    f"contiguous [{entry.rows}] = [{rows}] vector of {dtype}, got "
                    f"{part.dtype} {list(part.shape)}"
                    f"{'' if part.is_contiguous() else ' (not contiguous)'}")
            out.append(part)
        return out

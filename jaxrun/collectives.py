"""The collectives of a compiled program and which of them cross processes (hosts), read from its
optimised HLO text: what bench/comm_model.py reports and what the tests check of the sharding rules
("only the routed experts' psum crosses hosts").

Device groups appear in three forms in XLA's HLO text: explicit (`{{0,1},{2,3}}`), iota
(`[2,2]<=[4]`, `[2,2]<=[2,2]T(1,0)`) and mesh axes (`mesh['axis_0'=1,'axis_1'=2,'axis_2'=2],
device_ids=([2,2]T(1,0)) {'axis_1'}`); collective-permutes list `source_target_pairs`. Ids are
positions in the program's device assignment, which for a jaxrun step is the mesh's devices in order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_OP = re.compile(r"= (?P<shape>\S+) (?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                 r"(?:-start)?\(")
_MESH = re.compile(r"replica_groups=mesh\[(?P<axes>[^\]]*)\](?:, device_ids=\((?P<ids>[^)]*\)?)\))?"
                   r" \{(?P<group>[^}]*)\}")
_IOTA = re.compile(r"replica_groups=(?P<iota>\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)")
_EXPLICIT = re.compile(r"replica_groups=(?P<groups>\{(?:\{[\d,]*\},?)*\})")
_PAIRS = re.compile(r"source_target_pairs=(?P<pairs>\{(?:\{\d+,\d+\},?)*\})")
_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "u8": 1, "s8": 1, "pred": 1, "f64": 8, "s64": 8}


@dataclass(frozen=True)
class Collective:
    op: str                        # all-reduce, all-gather, ...
    shape: str                     # the result, as HLO prints it
    groups: tuple[tuple[int, ...], ...]   # device groups (for a permute: the (source, target) pairs)

    @property
    def nbytes(self) -> int:
        """Bytes of the result (of each tensor, for a tuple: their sum)."""
        total = 0
        for dtype, dims in re.findall(r"([a-z]+\d*)\[([\d,]*)\]", self.shape):
            total += _BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
        return total

    def crosses(self, process_of: list[int]) -> bool:
        """Whether a group holds devices of more than one process."""
        return any(len({process_of[d] for d in g}) > 1 for g in self.groups)


def collectives(hlo: str) -> list[Collective]:
    """Every collective of an HLO module's text, with its device groups."""
    found = []
    for line in hlo.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        found.append(Collective(m["op"], m["shape"], _groups(line)))
    return found


def cross_process(hlo: str, mesh) -> list[Collective]:
    """The collectives of a program compiled for `mesh` that move data between processes."""
    process_of = [d.process_index for d in mesh.devices.flat]
    return [c for c in collectives(hlo) if c.crosses(process_of)]


def _groups(line: str) -> tuple[tuple[int, ...], ...]:
    if m := _PAIRS.search(line):
        return tuple(tuple(map(int, p)) for p in re.findall(r"\{(\d+),(\d+)\}", m["pairs"]))
    if m := _MESH.search(line):
        sizes = [int(s) for s in re.findall(r"=(\d+)", m["axes"])]
        names = re.findall(r"'(\w+)'=", m["axes"])
        ids = _iota_order(m["ids"] or "", int(np.prod(sizes))).reshape(sizes)
        grouped = [names.index(n) for n in re.findall(r"'(\w+)'", m["group"])]
        rest = [i for i in range(len(sizes)) if i not in grouped]
        ids = np.transpose(ids, rest + grouped).reshape(-1, int(np.prod([sizes[i] for i in grouped])))
        return tuple(tuple(map(int, g)) for g in ids)
    if m := _IOTA.search(line):
        shape = [int(s) for s in re.match(r"\[([\d,]+)\]", m["iota"])[1].split(",")]
        ids = _iota_order(m["iota"].split("<=")[1], int(np.prod(shape))).reshape(shape)
        return tuple(tuple(map(int, g)) for g in ids.reshape(shape[0], -1))
    if m := _EXPLICIT.search(line):
        return tuple(tuple(map(int, g.split(","))) for g in re.findall(r"\{([\d,]+)\}", m["groups"]))
    return ()


def _iota_order(spec: str, n: int) -> np.ndarray:
    """'[2,2]T(1,0)' (or '[4]', '') -> the device order it names, flat."""
    if not spec:
        return np.arange(n)
    dims = [int(d) for d in re.match(r"\[([\d,]+)\]", spec)[1].split(",")]
    ids = np.arange(n).reshape(dims)
    if t := re.search(r"T\(([\d,]+)\)", spec):
        ids = np.transpose(ids, [int(p) for p in t[1].split(",")])
    return ids.reshape(-1)

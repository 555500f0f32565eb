"""Helpers for tests that damage copies of synthetic checkpoints, one tensor or file at a time."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from ref.checkpoint import INDEX, SINGLE
from ref.safetensors_io import SafetensorsFile, write_safetensors


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shard_of(d: Path, name: str) -> Path:
    index = d / INDEX
    if index.exists():
        return d / json.loads(index.read_text())["weight_map"][name]
    return d / SINGLE


def edit_tensors(d: Path, edits: dict[str, Callable[[np.ndarray], np.ndarray | None]]) -> None:
    """Rewrite the shards holding `edits`' tensors: fn(old) -> new array, or None to delete it."""
    by_shard: dict[Path, dict] = {}
    for name, fn in edits.items():
        by_shard.setdefault(shard_of(d, name), {})[name] = fn
    for path, fns in by_shard.items():
        f = SafetensorsFile(path)
        tensors = {n: np.array(f.tensor(n)) for n in f.tensors}
        for name, fn in fns.items():
            new = fn(tensors[name])
            if new is None:
                del tensors[name]
            else:
                tensors[name] = new
        del f
        write_safetensors(path, tensors, {"format": "pt"})
    index = d / INDEX
    if index.exists():
        raw = json.loads(index.read_text())
        gone = [n for n, fn in edits.items() if n not in _names(shard_of(d, n)) and n in raw["weight_map"]]
        for n in gone:
            del raw["weight_map"][n]
        index.write_text(json.dumps(raw))


def _names(path: Path) -> set[str]:
    return set(SafetensorsFile(path).tensors)


def edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    raw = json.loads(path.read_text())
    fn(raw)
    path.write_text(json.dumps(raw))


def edited_copy(src: Path, dst: Path, edits=None, config=None, quant=None) -> Path:
    """A copy of checkpoint `src` at `dst` with tensor edits and config.json / hf_quant_config.json edits."""
    d = copy_checkpoint(src, dst)
    if edits:
        edit_tensors(d, edits)
    if config:
        edit_json(d / "config.json", config)
    if quant:
        edit_json(d / "hf_quant_config.json", quant)
    return d

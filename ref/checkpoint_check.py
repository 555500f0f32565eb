"""Validate and lint a checkpoint: `python -m ref.checkpoint check DIR|REPO`.

Validation (errors, exit 2): every tensor the config implies is present with the right dtype and
shape, NVFP4 linears have consistent packed / block-scale widths, a scalar global scale and an input
scale, scalars are finite and positive, block scales hold no NaN bytes. Lint (warnings, exit 0): what
silently breaks engines — gate/up global or input scales that are not tied, block scales that
underflowed to 0, input scales that look uncalibrated, modules whose quantization disagrees with the
exclude list, tensors the config does not explain.
"""
from __future__ import annotations

import argparse
import fnmatch
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from ref import checkpoint_layout as layout
from ref.checkpoint import INDEX, SINGLE, Checkpoint, NVFP4Weight, open_checkpoint
from ref.errors import CheckpointError, ConfigError

FLOAT_DTYPES = ("BF16", "F16", "F32")
SCALAR_DTYPES = ("F32", "BF16")


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "warning"
    file: str
    tensor: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: tensor '{self.tensor}'" if self.tensor else self.file
        return f"{where}: {self.message}"


def findings(ckpt: Checkpoint, block_scales: bool = True) -> list[Finding]:
    """Every problem (errors) and lint finding (warnings). block_scales=False skips the scans of
    the block-scale bytes (about 1/9 of an NVFP4 checkpoint)."""
    c = _Checker(ckpt, block_scales)
    c.run()
    return c.out


def validate(ckpt: Checkpoint, block_scales: bool = True) -> list[Finding]:
    return [f for f in findings(ckpt, block_scales) if f.severity == "error"]


def lint(ckpt: Checkpoint, block_scales: bool = True) -> list[Finding]:
    return [f for f in findings(ckpt, block_scales) if f.severity == "warning"]


class _Checker:
    def __init__(self, ckpt: Checkpoint, block_scales: bool):
        self.ckpt, self.cfg, self.scan = ckpt, ckpt.config, block_scales
        self.out: list[Finding] = []
        self.seen: set[str] = set()
        self.quantized: dict[str, bool] = {}  # module -> stored NVFP4?
        idx = ckpt.directory / INDEX
        self.weights_file = str(idx if idx.exists() else ckpt.directory / SINGLE)

    # ---- reporting --------------------------------------------------------------------------

    def _file(self, name: str) -> str:
        return str(self.ckpt.file_of(name).path) if self.ckpt.has(name) else self.weights_file

    def error(self, name: str, msg: str) -> None:
        self.out.append(Finding("error", self._file(name), name, msg))

    def warn(self, name: str, msg: str) -> None:
        self.out.append(Finding("warning", self._file(name), name, msg))

    # ---- primitive checks -------------------------------------------------------------------

    def get(self, name: str, dtypes: tuple[str, ...], shape: tuple | None, prefetch: bool = False) -> np.ndarray | None:
        """The tensor if present with an allowed dtype and (if given) shape, else None (reported);
        prefetch when its bytes will be scanned."""
        self.seen.add(name)
        if not self.ckpt.has(name):
            self.error(name, "missing")
            return None
        info = self.ckpt.file_of(name).info(name)
        if info.dtype not in dtypes:
            self.error(name, f"dtype {info.dtype}, expected {' or '.join(dtypes)}")
            return None
        if shape is not None and info.shape != tuple(shape):
            self.error(name, f"shape {list(info.shape)}, expected {list(shape)}")
            return None
        return self.ckpt.tensor(name, prefetch=prefetch)

    def scales(self, name: str, shapes: tuple[tuple, ...], required: bool = True) -> np.ndarray | None:
        """A global / input scale: one of `shapes`, F32 or BF16, finite and positive -> float64 values."""
        if not required and not self.ckpt.has(name):
            return None
        t = self.get(name, SCALAR_DTYPES, None)
        if t is None:
            return None
        if t.shape not in shapes:
            self.error(name, f"shape {list(t.shape)}, expected one of {[list(s) for s in shapes]}")
            return None
        v = t.astype(np.float64)
        if not np.all(np.isfinite(v) & (v > 0)):
            bad = v[~(np.isfinite(v) & (v > 0))].reshape(-1)[0]
            self.error(name, f"scale must be finite and positive, found {bad}")
            return None
        return v

    def block_scales(self, name: str, shape: tuple) -> None:
        t = self.get(name, ("F8_E4M3",), shape, prefetch=self.scan)
        if t is None or not self.scan:
            return
        b = t.view(np.uint8)
        nan = int(np.count_nonzero((b & 0x7F) == 0x7F))
        if nan:
            self.error(name, f"{nan} block scale bytes are NaN (0x7F/0xFF)")
        zero = int(np.count_nonzero((b & 0x7F) == 0))
        if zero:
            self.warn(name, f"{zero} of {b.size} block scales underflowed to 0 (those blocks decode to 0)")

    # ---- modules ----------------------------------------------------------------------------

    def linear(self, module: str, out: int, k: int, lead: tuple = ()) -> None:
        """A (possibly stacked [E, ...]) linear [out, in]: NVFP4 if `.weight_scale` is present, else float."""
        fused = bool(lead)
        w, ws = (f"{module}", f"{module}_weight_scale") if fused else (f"{module}.weight", f"{module}.weight_scale")
        quant = self.ckpt.has(ws)
        self.quantized[module] = quant
        if not quant:
            self.get(w, FLOAT_DTYPES, lead + (out, k))
            return
        if k % 16:
            self.error(w, f"input width {k} is not a multiple of the NVFP4 block size 16")
            return
        self.get(w, ("U8",), lead + (out, k // 2))
        self.block_scales(ws, lead + (out, k // 16))
        if fused:
            n = lead[0]
            shapes = ((), (1,), (n,), (n, 2)) if module.endswith("gate_up_proj") else ((), (1,), (n,))
            self.scales(f"{module}_weight_scale_2", shapes)
            self.scales(f"{module}_input_scale", shapes)
        else:
            self.scales(f"{module}.weight_scale_2", ((), (1,)))
            self.scales(f"{module}.input_scale", ((), (1,)))

    def dense(self) -> None:
        for name, shape in layout.dense_tensors(self.cfg).items():
            if layout.is_linear(name, shape):
                self.linear(name[: -len(".weight")], *shape)
            else:
                self.get(name, FLOAT_DTYPES, shape)

    def experts(self, layer) -> None:
        t = self.cfg.text
        p, n = self.ckpt.experts_prefix(layer), t.num_experts
        shapes = layout.expert_shapes(t)
        try:
            kind = self.ckpt.expert_layout(layer)
        except CheckpointError:
            self.error(f"{p}.gate_up_proj", f"routed experts of layer {layer} missing (neither per-expert "
                                            f"'{p}.0.gate_proj.weight' nor fused '{p}.gate_up_proj')")
            return
        before = len(self.out)
        if kind == "per-expert":
            for e in range(n):
                for proj, (o, k) in shapes.items():
                    self.linear(f"{p}.{e}.{proj}", o, k)
        else:
            i, h = shapes["gate_proj"]
            self.linear(f"{p}.gate_up_proj", 2 * i, h, (n,))
            self.linear(f"{p}.down_proj", h, i, (n,))
        if len([f for f in self.out[before:] if f.severity == "error"]) == 0:
            self.expert_scales(layer)

    def expert_scales(self, layer) -> None:
        """Lint the scalars of one layer's experts through the normalised accessor."""
        n = self.cfg.text.num_experts
        ex = [self.ckpt.expert(layer, e, prefetch=False) for e in range(n)]
        if not isinstance(ex[0].gate, NVFP4Weight):
            return
        p = self.ckpt.experts_prefix(layer)
        fused = self.ckpt.expert_layout(layer) == "fused"
        where = (lambda e, proj, what: f"{p}.gate_up_proj_{what}") if fused else \
            (lambda e, proj, what: f"{p}.{e}.{proj}.{what}")
        for what, attr in (("weight_scale_2", "weight_scale_2"), ("input_scale", "input_scale")):
            g = np.array([float(getattr(x.gate, attr)) for x in ex])
            u = np.array([float(getattr(x.up, attr)) for x in ex])
            bad = np.flatnonzero(g != u)  # ModelOpt ties exactly; any difference breaks fused w13 kernels
            if bad.size:
                e = int(bad[np.argmax(np.maximum(g, u)[bad] / np.minimum(g, u)[bad])])
                ratio = max(g[e], u[e]) / min(g[e], u[e])
                self.warn(where(e, "up_proj", what),
                          f"layer {layer}: gate/up {what} not tied in {bad.size}/{n} experts (worst: expert {e}, "
                          f"ratio {ratio:.3g}); engines that fuse w13 use the gate's value for both")
        for proj, part in (("gate_proj", "gate"), ("down_proj", "down")):
            s = np.array([float(getattr(x, part).input_scale) for x in ex])
            name = where(0, proj, "input_scale") if not fused else \
                f"{p}.{'gate_up_proj' if proj == 'gate_proj' else 'down_proj'}_input_scale"
            self.uncalibrated(name, layer, proj, s)

    def uncalibrated(self, name: str, layer, proj: str, s: np.ndarray) -> None:
        n = s.size
        if np.any(s == 1.0):
            self.warn(name, f"layer {layer}: {int(np.sum(s == 1.0))}/{n} {proj} input scales are exactly 1.0 "
                            f"(a default, not a calibrated amax/2688)")
        elif n > 1 and np.all(s == s[0]):
            self.warn(name, f"layer {layer}: all {n} experts share one {proj} input scale {s[0]:.6g} "
                            f"(not calibrated per expert)")
        elif n > 2 and np.sum(s == s.max()) > n // 2:
            self.warn(name, f"layer {layer}: {int(np.sum(s == s.max()))}/{n} experts carry the layer's max "
                            f"{proj} input scale (calibration reached few experts)")

    def exclude_list(self) -> None:
        """Quantized modules the exclude list names, and BF16 linears it does not name (grouped)."""
        q = self.cfg.quant
        if q is None:
            if any(self.quantized.values()):
                mod = next(m for m, v in self.quantized.items() if v)
                self.warn(mod, "NVFP4 tensors present but the config declares no quantization")
            return
        if q.quant_algo != "NVFP4":  # MIXED_PRECISION lists quantized_layers instead
            return
        groups: dict[tuple[str, bool], list[str]] = defaultdict(list)
        for module, quant in self.quantized.items():
            excluded = any(fnmatch.fnmatchcase(module, pat) for pat in q.exclude_modules)
            if quant == excluded:
                groups[(re.sub(r"\.\d+\.", ".*.", module), quant)].append(module)
        for (pattern, quant), mods in sorted(groups.items()):
            what = ("stored NVFP4 but the exclude list says BF16" if quant else
                    "stored BF16 but not in the exclude list (expected NVFP4)")
            self.warn(mods[0], f"{len(mods)} module(s) like '{pattern}' {what}")

    def unexpected(self) -> None:
        extra = [n for n in self.ckpt.names() if n not in self.seen]
        kinds = Counter(re.sub(r"\.\d+\.", ".*.", n) for n in extra)
        for kind, count in sorted(kinds.items()):
            self.warn(next(n for n in extra if re.sub(r"\.\d+\.", ".*.", n) == kind),
                      f"{count} tensor(s) like '{kind}' not implied by the config")

    def kv_scales(self) -> None:
        """FP8 / NVFP4 KV cache: k_proj.k_scale and v_proj.v_scale scalars on every full-attention layer."""
        q = self.cfg.quant
        if q is None or not q.kv_cache_quant_algo:
            return
        prefixes = [f"{self.cfg.text_prefix}layers.{i}" for i in self.cfg.text.full_attention_layers]
        prefixes += ["mtp.layers.0"] if self.cfg.text.mtp_num_hidden_layers else []
        for p in prefixes:
            self.scales(f"{p}.self_attn.k_proj.k_scale", ((), (1,)))
            self.scales(f"{p}.self_attn.v_proj.v_scale", ((), (1,)))

    def run(self) -> None:
        self.dense()
        self.kv_scales()
        for layer in layout.expert_layers(self.cfg):
            self.experts(layer)
        self.exclude_list()
        self.unexpected()


# ------------------------------------------------------------------------------------------------
# Summary

GROUPS = (("routed experts", r"mlp\.experts\."), ("mtp", r"^mtp\."), ("vision", r"^model\.visual\."),
          ("embeddings", r"embed_tokens"), ("lm_head", r"^lm_head"), ("linear attention", r"\.linear_attn\."),
          ("full attention", r"\.self_attn\."), ("shared experts", r"\.shared_expert"), ("router", r"\.mlp\.gate\."))


def _group(name: str) -> str:
    if name.startswith("mtp."):
        return "mtp"
    return next((g for g, pat in GROUPS if re.search(pat, name)), "norms and other")


def _linear_kind(ckpt: Checkpoint, name: str, shape: tuple) -> tuple[str | None, int]:
    """('NVFP4' | 'float', number of [out, in] linears) for a tensor holding linear weights, else (None, 0)."""
    if name.endswith(("gate_up_proj", "down_proj")) and len(shape) == 3:  # fused experts: E (x2 for gate_up)
        return ("NVFP4" if ckpt.has(name + "_weight_scale") else "float"), shape[0] * (2 if "gate_up" in name else 1)
    if layout.is_linear(name, shape):
        return ("NVFP4" if ckpt.has(name[: -len("weight")] + "weight_scale") else "float"), 1
    return None, 0


def summary(ckpt: Checkpoint) -> str:
    t, q = ckpt.config.text, ckpt.config.quant
    kinds = Counter(t.layer_types)
    sizes: Counter = Counter()
    dtypes: dict[str, Counter] = defaultdict(Counter)
    linears: dict[str, Counter] = defaultdict(Counter)  # group -> {"NVFP4": n, "float": n} linear layers
    for name in ckpt.names():
        info = ckpt.file_of(name).info(name)
        sizes[_group(name)] += info.nbytes
        dtypes[_group(name)][info.dtype] += info.nbytes
        kind, per = _linear_kind(ckpt, name, info.shape)
        if kind:
            linears[_group(name)][kind] += per
    layouts = sorted({ckpt.expert_layout(layer) for layer in range(t.num_hidden_layers)})
    mtp = f"{ckpt.expert_layout('mtp')} MTP experts" if t.mtp_num_hidden_layers else "no MTP"
    files = {ckpt.file_of(n).path.name for n in ckpt.names()}
    lines = [
        f"checkpoint {ckpt.directory}",
        f"  {'VL wrapper' if ckpt.config.multimodal else 'text-only'}, {t.num_hidden_layers} layers "
        f"({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}), hidden {t.hidden_size}, vocab {t.vocab_size}",
        f"  experts: {t.num_experts} per layer, top-{t.num_experts_per_tok}, intermediate {t.moe_intermediate_size}, "
        f"{'/'.join(layouts)} layout, {mtp}",
        f"  quantization: {q.quant_algo + ' group ' + str(q.group_size) + ' (' + (q.producer or '?') + ')' if q else 'none'}"
        f", kv cache: {q.kv_cache_quant_algo if q and q.kv_cache_quant_algo else 'unquantized'}",
        f"  {len(ckpt.names())} tensors in {len(files)} file(s), {sum(sizes.values()) / 1e9:.3f} GB",
    ]
    for g in [g for g, _ in GROUPS] + ["norms and other"]:
        if sizes[g]:
            by = ", ".join(f"{d} {b / 1e6:.1f} MB" for d, b in dtypes[g].most_common())
            n = " + ".join(f"{v} {k}" for k, v in sorted(linears[g].items()))
            lines.append(f"    {g:<17} {sizes[g] / 1e6:12.1f} MB  ({by}){'; linears: ' + n if n else ''}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# CLI

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ref.checkpoint")
    sub = ap.add_subparsers(dest="command", required=True)
    chk = sub.add_parser("check", help="validate, summarise and lint a checkpoint")
    chk.add_argument("model", help="checkpoint directory or Hugging Face repo id")
    chk.add_argument("--no-block-scan", action="store_true", help="skip scanning the block-scale bytes")
    a = ap.parse_args(argv)
    try:
        ckpt = open_checkpoint(a.model)
        found = findings(ckpt, block_scales=not a.no_block_scan)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    errors = [f for f in found if f.severity == "error"]
    for f in errors:
        print(f"error: {f}", file=sys.stderr)
    if errors:
        return 2
    print(summary(ckpt))
    for f in found:
        print(f"warning: {f}")
    print(f"ok: valid, {len(found)} lint warning(s)")
    return 0

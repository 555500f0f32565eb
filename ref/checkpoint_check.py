"""Validate and lint a checkpoint: `python -m ref.checkpoint check DIR|REPO`.

Validation (errors, exit 2): every tensor the config implies is present with the right dtype and
shape, NVFP4 linears (ModelOpt or compressed-tensors names) have consistent packed / block-scale
widths, scalar global and input scales, FP8 linears a per-tensor weight_scale and input_scale,
scalars are finite and positive, block scales hold no NaN bytes; and what makes engines compute
garbage without an error: tensor names of the other convention than the config's (ModelOpt vs
compressed-tensors), a global scale in the wrong direction (weights that decode beyond +-1e4 or
below 1e-6), quantized modules that a MIXED_PRECISION config's quantized_layers does not list
with their algorithm, a v_scale without a k_scale. Lint (warnings, exit 0): what silently breaks
engines — gate/up global or input scales that are not tied, FP8 pieces that engines fuse with
different scales, block scales that underflowed to 0, input scales that look uncalibrated or
inverted, modules whose quantization disagrees with the exclude / ignore list, tensors the config
does not explain.
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from ref import checkpoint_layout as layout
from ref.checkpoint import INDEX, SINGLE, Checkpoint, NVFP4Weight, open_checkpoint
from ref.errors import CheckpointError, ConfigError
from ref.nvfp4 import E4M3

FLOAT_DTYPES = ("BF16", "F16", "F32")
SCALAR_DTYPES = ("F32", "BF16")
DECODE_RANGE = (1e-6, 1e4)  # the largest |w| a quantized weight can decode to must lie in this range
INPUT_RANGE_MAX = 1e4  # the largest input a static input scale can represent (lint above this)
CT_NAMES = (".weight_packed", ".weight_global_scale", ".input_global_scale")
MODELOPT_NAMES = (".weight_scale_2", ".input_scale")
# pieces engines fuse into one GEMM (one weight_scale after requantize_with_max_scale)
FUSED_PIECES = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("linear_attn", ("in_proj_qkv", "in_proj_z")),
                ("mlp.shared_expert", ("gate_proj", "up_proj")))


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
        self.kinds: dict[str, str] = {}  # module -> "bf16" | "nvfp4" | "fp8" as stored
        self.conventions: dict[str, str] = {}  # quantized module -> "modelopt" | "compressed-tensors"
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

    def block_scales(self, name: str, shape: tuple) -> float:
        """Check an E4M3 block-scale tensor; -> its largest scale (448 when not scanned or unreadable)."""
        t = self.get(name, ("F8_E4M3",), shape, prefetch=self.scan)
        if t is None or not self.scan:
            return 448.0
        b = t.view(np.uint8)
        nan = int(np.count_nonzero((b & 0x7F) == 0x7F))
        if nan:
            self.error(name, f"{nan} block scale bytes are NaN (0x7F/0xFF)")
        zero = int(np.count_nonzero((b & 0x7F) == 0))
        if zero:
            self.warn(name, f"{zero} of {b.size} block scales underflowed to 0 (those blocks decode to 0)")
        finite = (b & 0x7F)[(b & 0x7F) != 0x7F]
        return float(np.max(finite.view(E4M3).astype(np.float64))) if finite.size else 448.0

    def decode_range(self, name: str, largest: float, what: str) -> None:
        """Error when the largest value a quantized weight decodes to is out of DECODE_RANGE."""
        lo, hi = DECODE_RANGE
        if largest > hi or 0 < largest < lo:
            self.error(name, f"weights decode up to {largest:.4g} ({what}), outside [{lo:g}, {hi:g}]: the global "
                             f"scale looks inverted (ModelOpt stores amax/2688 in weight_scale_2 and amax/448 in an "
                             f"FP8 weight_scale; compressed-tensors stores 2688/amax in weight_global_scale)")

    def input_range(self, name: str, largest: float) -> None:
        if largest > INPUT_RANGE_MAX:
            self.warn(name, f"the static input scale represents inputs up to {largest:.4g} (more than "
                            f"{INPUT_RANGE_MAX:g}): inverted, or an uncalibrated placeholder?")

    def conflicting(self, module: str, present: str, names: tuple[str, ...], kind: str) -> bool:
        """Error when a module stored in one convention also has tensors of the other."""
        other = [module + n for n in names if self.ckpt.has(module + n)]
        for name in other:
            self.seen.add(name)
            self.error(name, f"mixes conventions: {kind} '{module}{present}' next to '{name}'")
        return bool(other)

    # ---- modules ----------------------------------------------------------------------------

    def linear(self, module: str, out: int, k: int, lead: tuple = ()) -> None:
        """A (possibly stacked [E, ...]) linear [out, in] in whichever form is stored: BF16, ModelOpt
        NVFP4, ModelOpt FP8 per-tensor, or compressed-tensors NVFP4 (`.weight_packed`)."""
        fused = bool(lead)
        w, ws = (f"{module}", f"{module}_weight_scale") if fused else (f"{module}.weight", f"{module}.weight_scale")
        if not fused and self.ckpt.has(f"{module}.weight_packed"):
            return self.ct_linear(module, out, k)
        stored = self.ckpt.file_of(w).info(w).dtype if self.ckpt.has(w) else None
        if not self.ckpt.has(ws):
            self.kinds[module] = "bf16"
            if stored == "F8_E4M3":
                self.seen.add(w)
                self.kinds[module] = "fp8"
                self.error(w, f"FP8 weight without its '{ws}' (missing)")
                return
            self.get(w, FLOAT_DTYPES, lead + (out, k))
            return
        if stored == "F8_E4M3" and not fused:
            return self.fp8_linear(module, out, k)
        self.kinds[module], self.conventions[module] = "nvfp4", "modelopt"
        if not fused:
            self.conflicting(module, ".weight_scale_2", CT_NAMES[1:], "ModelOpt")
        if k % 16:
            self.error(w, f"input width {k} is not a multiple of the NVFP4 block size 16")
            return
        self.get(w, ("U8",), lead + (out, k // 2))
        top = self.block_scales(ws, lead + (out, k // 16))
        if fused:
            n = lead[0]
            shapes = ((), (1,), (n,), (n, 2)) if module.endswith("gate_up_proj") else ((), (1,), (n,))
            g = self.scales(f"{module}_weight_scale_2", shapes)
            self.scales(f"{module}_input_scale", shapes)
            name = f"{module}_weight_scale_2"
        else:
            g = self.scales(f"{module}.weight_scale_2", ((), (1,)))
            s_in = self.scales(f"{module}.input_scale", ((), (1,)))
            name = f"{module}.weight_scale_2"
            if s_in is not None:
                self.input_range(f"{module}.input_scale", 2688.0 * float(np.max(s_in)))
        if g is not None:
            self.decode_range(name, 6.0 * top * float(np.max(g)), "6 x largest block scale x weight_scale_2")

    def fp8_linear(self, module: str, out: int, k: int) -> None:
        """ModelOpt per-tensor FP8: weight F8_E4M3 [out, in], weight_scale and input_scale F32 []."""
        self.kinds[module], self.conventions[module] = "fp8", "modelopt"
        self.conflicting(module, ".weight_scale", CT_NAMES, "FP8")
        self.get(f"{module}.weight", ("F8_E4M3",), (out, k))
        ws = self.scales(f"{module}.weight_scale", ((), (1,)))
        s_in = self.scales(f"{module}.input_scale", ((), (1,)))
        if ws is not None:
            self.decode_range(f"{module}.weight_scale", 448.0 * float(ws.max()), "448 x weight_scale")
        if s_in is not None:
            self.input_range(f"{module}.input_scale", 448.0 * float(s_in.max()))

    def ct_linear(self, module: str, out: int, k: int) -> None:
        """compressed-tensors NVFP4: weight_packed U8, weight_scale F8_E4M3, weight_global_scale and
        input_global_scale F32 [1] (quantization direction: 2688 / amax)."""
        self.kinds[module], self.conventions[module] = "nvfp4", "compressed-tensors"
        self.conflicting(module, ".weight_packed", MODELOPT_NAMES + (".weight",), "compressed-tensors")
        if k % 16:
            self.error(f"{module}.weight_packed", f"input width {k} is not a multiple of the NVFP4 block size 16")
            return
        self.get(f"{module}.weight_packed", ("U8",), (out, k // 2))
        top = self.block_scales(f"{module}.weight_scale", (out, k // 16))
        g = self.scales(f"{module}.weight_global_scale", ((), (1,)))
        g_in = self.scales(f"{module}.input_global_scale", ((), (1,)))
        if g is not None:
            self.decode_range(f"{module}.weight_global_scale", 6.0 * top / float(g.max()),
                              "6 x largest block scale / weight_global_scale")
        if g_in is not None:
            self.input_range(f"{module}.input_global_scale", 2688.0 / float(g_in.max()))

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
        ct = self.ckpt.has(f"{p}.0.gate_proj.weight_packed")
        stored = {"weight_scale_2": "weight_global_scale", "input_scale": "input_global_scale"} if ct else {}
        where = (lambda e, proj, what: f"{p}.gate_up_proj_{what}") if fused else \
            (lambda e, proj, what: f"{p}.{e}.{proj}.{stored.get(what, what)}")
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

    def _grouped(self, items, message, severity) -> None:
        """One finding per module pattern (digits -> *): items are (module, key) pairs."""
        groups: dict[tuple, list[str]] = defaultdict(list)
        for module, key in items:
            groups[(re.sub(r"\.\d+\.", ".*.", module), key)].append(module)
        for (pattern, key), mods in sorted(groups.items(), key=str):
            severity(mods[0], f"{len(mods)} module(s) like '{pattern}' {message(key)}")

    def conventions_match(self) -> None:
        """Errors for modules stored in the other naming convention than the config declares."""
        q = self.cfg.quant
        want = q.convention if q is not None else None
        if want is None:
            return
        wrong = [(m, c) for m, c in self.conventions.items() if c != want]
        self._grouped(wrong, lambda c: f"use {c} tensor names but the config is {want} (quant_method "
                                       f"{q.method!r}): the checkpoint mixes conventions", self.error)

    def quantized_layers(self) -> None:
        """MIXED_PRECISION: every quantized module listed with its algorithm, nothing else listed."""
        q = self.cfg.quant
        listed = q.quantized_layers

        def algo_of(module: str) -> str | None:
            exact = dict(listed).get(module)
            if exact is not None:
                return exact
            return next((a for pat, a in listed if any(c in pat for c in "*?[") and fnmatch.fnmatchcase(module, pat)),
                        None)

        bad = []
        for module, kind in self.kinds.items():
            algo, stored = algo_of(module), {"bf16": None, "nvfp4": "NVFP4", "fp8": "FP8"}[kind]
            if algo != stored:
                bad.append((module, (stored, algo)))

        def message(key):
            stored, algo = key
            if algo is None:
                return (f"stored {stored} but quantization_config.quantized_layers does not list them (engines then "
                        f"build unquantized layers and read the {stored} bytes as BF16)")
            if stored is None:
                return f"stored BF16 but quantized_layers lists them as {algo}"
            return f"stored {stored} but quantized_layers says {algo}"
        self._grouped(bad, message, self.error)

    def exclude_list(self) -> None:
        """Quantized modules the exclude / ignore list names, and BF16 linears it does not name
        (grouped); MIXED_PRECISION: the quantized_layers check."""
        q = self.cfg.quant
        if q is None:
            quantized = [m for m, k in self.kinds.items() if k != "bf16"]
            if quantized:
                self.warn(quantized[0], "quantized tensors present but the config declares no quantization")
            return
        if q.quant_algo == "MIXED_PRECISION":
            return self.quantized_layers()
        fp8 = [(m, "fp8") for m, k in self.kinds.items() if k == "fp8"]
        self._grouped(fp8, lambda _: f"stored FP8 but the config's quant_algo is {q.quant_algo} (no FP8 layers)",
                      self.error)
        ct = q.convention == "compressed-tensors"
        mismatched = []
        for module, kind in self.kinds.items():
            quant = kind == "nvfp4"
            excluded = _ct_ignored(module, q.exclude_modules) if ct else \
                any(fnmatch.fnmatchcase(module, pat) for pat in q.exclude_modules)
            if kind != "fp8" and quant == excluded:
                mismatched.append((module, quant))
        listing = "ignore list" if ct else "exclude list"
        self._grouped(mismatched, lambda quant: f"stored NVFP4 but the {listing} says BF16" if quant else
                      f"stored BF16 but not in the {listing} (expected NVFP4)", self.warn)

    def fused_fp8_scales(self) -> None:
        """Warn when FP8 pieces that engines fuse into one GEMM have different scales."""
        prefixes = [f"{self.cfg.text_prefix}layers.{i}" for i in range(self.cfg.text.num_hidden_layers)]
        prefixes += ["mtp.layers.0"] if self.cfg.text.mtp_num_hidden_layers else []
        for p in prefixes:
            for block, pieces in FUSED_PIECES:
                mods = [f"{p}.{block}.{x}" for x in pieces]
                if not all(self.kinds.get(m) == "fp8" for m in mods):
                    continue
                for what in ("weight_scale", "input_scale"):
                    names = [f"{m}.{what}" for m in mods]
                    if not all(map(self.ckpt.has, names)):
                        continue
                    v = np.array([float(self.ckpt.tensor(n).astype(np.float64).reshape(-1)[0]) for n in names])
                    if np.all(v > 0) and v.max() != v.min():
                        effect = ("requantize every piece to the largest (a second rounding)"
                                  if what == "weight_scale" else "use one input scale")
                        self.warn(names[int(np.argmin(v))], f"{'/'.join(pieces)} {what}s differ (ratio "
                                                            f"{v.max() / v.min():.3g}); engines that fuse them {effect}")

    def unexpected(self) -> None:
        extra = [n for n in self.ckpt.names() if n not in self.seen]
        kinds = Counter(re.sub(r"\.\d+\.", ".*.", n) for n in extra)
        for kind, count in sorted(kinds.items()):
            self.warn(next(n for n in extra if re.sub(r"\.\d+\.", ".*.", n) == kind),
                      f"{count} tensor(s) like '{kind}' not implied by the config")

    def kv_scales(self) -> None:
        """When the config declares a KV-cache format: k/v scales, ModelOpt (<attn>.k_proj.k_scale)
        or compressed-tensors (<attn>.k_scale) names, on every full-attention layer; MTP's layer
        only needs them if it has either (ModelOpt leaves the MTP block unquantized)."""
        q = self.cfg.quant
        if q is None or not q.kv_cache_quant_algo:
            return
        prefixes = [f"{self.cfg.text_prefix}layers.{i}" for i in self.cfg.text.full_attention_layers]
        prefixes += ["mtp.layers.0"] if self.cfg.text.mtp_num_hidden_layers else []
        for p in prefixes:
            a = f"{p}.self_attn"
            found = {kind: next((n for n in (f"{a}.{kind}_proj.{kind}_scale", f"{a}.{kind}_scale") if self.ckpt.has(n)),
                                None) for kind in ("k", "v")}
            for kind, name in found.items():
                if name is not None:
                    self.scales(name, ((), (1,)))
                elif not p.startswith("mtp.") or any(found.values()):
                    self.error(f"{a}.{kind}_proj.{kind}_scale", f"missing (the config declares a "
                                                                f"{q.kv_cache_quant_algo} KV cache)")

    def run(self) -> None:
        self.dense()
        self.kv_scales()
        for layer in layout.expert_layers(self.cfg):
            self.experts(layer)
        self.conventions_match()
        self.exclude_list()
        self.fused_fp8_scales()
        self.unexpected()


def _ct_ignored(module: str, ignore: tuple[str, ...]) -> bool:
    """compressed-tensors' ignore matching: 're:' entries are regexes matched at the start of the
    module name (re.match), others must equal it."""
    return any(re.match(e[3:], module) if e.startswith("re:") else e == module for e in ignore)


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
    """('NVFP4' | 'FP8' | 'float', number of [out, in] linears) for a tensor holding linear weights,
    else (None, 0)."""
    if name.endswith(("gate_up_proj", "down_proj")) and len(shape) == 3:  # fused experts: E (x2 for gate_up)
        return ("NVFP4" if ckpt.has(name + "_weight_scale") else "float"), shape[0] * (2 if "gate_up" in name else 1)
    if name.endswith(".weight_packed") and len(shape) == 2:
        return "NVFP4", 1
    if layout.is_linear(name, shape):
        if ckpt.file_of(name).info(name).dtype == "F8_E4M3":
            return "FP8", 1
        return ("NVFP4" if ckpt.has(name[: -len("weight")] + "weight_scale") else "float"), 1
    return None, 0


def _quant_text(q) -> str:
    if q is None:
        return "none"
    method = "" if q.method == "modelopt" else f", quant_method {q.method}"
    return f"{q.quant_algo} group {q.group_size} ({q.producer or '?'}{method})"


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
        f"  quantization: {_quant_text(q)}"
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

MAX_GROUPS = 40  # problem lines printed by the CLI at most


def grouped(found: list[Finding]) -> list[str]:
    """One line per kind of problem: findings whose tensor names and messages differ only in numbers
    (layer, expert, shard indices) are one group, shown by its first member and a count."""
    groups: dict[tuple, list[Finding]] = defaultdict(list)
    for f in found:
        groups[(f.severity, re.sub(r"\d+", "*", f.tensor), re.sub(r"\d+", "#", f.message))].append(f)
    lines = []
    for (_, pattern, _), members in groups.items():
        more = f" (and {len(members) - 1} more like '{pattern}')" if len(members) > 1 else ""
        lines.append(f"{members[0].severity}: {members[0]}{more}")
    return lines


def likely_cause(ckpt: Checkpoint, errors: list[Finding]) -> str | None:
    """When tensors disagree with the config in shape, the config field that explains them: of the
    integer fields of the config's size, the one whose value set to the size found makes the most
    mismatched tensors match ('config says num_experts = 32, the checkpoint has 16 (5 tensors)')."""
    shapes = {}
    for f in errors:
        if re.search(r"shape \[[\d, ]*\], expected \[", f.message) and ckpt.has(f.tensor):
            shapes[f.tensor] = tuple(ckpt.file_of(f.tensor).info(f.tensor).shape)
    best = (0, None, None, None)
    for name, want in vars(ckpt.config.text).items():
        if not isinstance(want, int) or isinstance(want, bool):
            continue
        for have in {d for shape in shapes.values() for d in shape} - {want}:
            cfg = dataclasses.replace(ckpt.config, text=dataclasses.replace(ckpt.config.text, **{name: have}))
            try:
                expected = layout.dense_tensors(cfg)
            except (ValueError, ArithmeticError, LookupError):  # a size the config cannot take
                continue
            n = sum(expected.get(t) == shape for t, shape in shapes.items())
            if n > best[0]:
                best = (n, name, want, have)
    n, name, want, have = best
    if n < 2:
        return None
    return (f"{ckpt.directory / 'config.json'}: likely cause: config says {name} = {want}, the checkpoint has "
            f"{have} ({n} tensors match {name} = {have})")


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
    if errors:
        lines = grouped(errors)
        cause = likely_cause(ckpt, errors)
        for line in ([f"error: {cause}"] if cause else []) + lines[:MAX_GROUPS]:
            print(line, file=sys.stderr)
        if len(lines) > MAX_GROUPS:
            print(f"error: {ckpt.directory}: {len(lines) - MAX_GROUPS} more kinds of problem not shown "
                  f"({len(errors)} problems in all)", file=sys.stderr)
        return 2
    print(summary(ckpt))
    for line in grouped(found):
        print(line)
    print(f"ok: valid, {len(found)} lint warning(s)")
    return 0

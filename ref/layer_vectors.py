"""Conformance vectors for the layer functions: small float64 cases written to spec/vectors/layers/.

`python -m ref.layer_vectors [--out DIR]` (re)writes one safetensors file per case; the schema is in
spec/vectors/layers/README.md. Tests recompute every case with ref.layers and compare.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from ref import layers as L

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "spec" / "vectors" / "layers"
EPS = 1e-6


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _deltanet_inputs(r: np.random.Generator, T: int, H=16, Hk=2, Hv=4, dk=8, dv=6, K=4, state=True) -> dict:
    C = 2 * Hk * dk + Hv * dv
    s = 1 / np.sqrt(H)
    d = {"x": r.normal(size=(T, H)),
         "in_proj_qkv": r.normal(size=(C, H)) * s, "in_proj_z": r.normal(size=(Hv * dv, H)) * s,
         "in_proj_b": r.normal(size=(Hv, H)) * s, "in_proj_a": r.normal(size=(Hv, H)) * s,
         "conv1d": r.normal(size=(C, K)) * 0.5, "dt_bias": r.normal(size=Hv),
         "A_log": np.log(r.uniform(0.5, 4, size=Hv)), "norm": 1 + 0.1 * r.normal(size=dv),
         "out_proj": r.normal(size=(H, Hv * dv)) / np.sqrt(Hv * dv)}
    if state:
        d["conv_state"] = r.normal(size=(K - 1, C))
        d["recurrent_state"] = r.normal(size=(Hv, dk, dv)) * 0.3
    return d


def _attention_inputs(r: np.random.Generator, T: int, past: int, H=16, nH=4, nKV=2, D=16) -> dict:
    s = 1 / np.sqrt(H)
    pos = np.stack([np.arange(past, past + T), np.arange(past, past + T) * 2 + 1, np.arange(past, past + T)[::-1]])
    d = {"x": r.normal(size=(T, H)), "q_proj": r.normal(size=(nH * 2 * D, H)) * s,
         "k_proj": r.normal(size=(nKV * D, H)) * s, "v_proj": r.normal(size=(nKV * D, H)) * s,
         "o_proj": r.normal(size=(H, nH * D)) / np.sqrt(nH * D), "q_norm": 0.1 * r.normal(size=D),
         "k_norm": 0.1 * r.normal(size=D), "positions": pos.astype(np.int64)}
    if past:
        d["cache_k"], d["cache_v"] = r.normal(size=(past, nKV, D)), r.normal(size=(past, nKV, D))
    return d


def _moe_inputs(r: np.random.Generator, T=6, H=16, E=8, I=12, Is=10) -> dict:
    router = r.normal(size=(E, H)) / np.sqrt(H)
    router[5] = router[2]  # two experts with identical router rows: ties go to the lower id
    return {"x": r.normal(size=(T, H)), "router": router,
            "experts_gate": r.normal(size=(E, I, H)) / np.sqrt(H), "experts_up": r.normal(size=(E, I, H)) / np.sqrt(H),
            "experts_down": r.normal(size=(E, H, I)) / np.sqrt(I),
            "shared_gate_proj": r.normal(size=(Is, H)) / np.sqrt(H), "shared_up_proj": r.normal(size=(Is, H)) / np.sqrt(H),
            "shared_down_proj": r.normal(size=(H, Is)) / np.sqrt(Is), "shared_expert_gate": r.normal(size=(1, H)) / np.sqrt(H)}


def cases() -> dict[str, tuple[str, dict, dict]]:
    """name -> (function, float64/int64 inputs, scalar arguments)."""
    r = _rng(20261128)
    out = {
        "rms_norm": ("rms_norm", {"x": r.normal(size=(5, 8)) * 3, "w": 0.1 * r.normal(size=8)}, {"eps": EPS}),
        "gated_rms_norm": ("gated_rms_norm", {"x": r.normal(size=(5, 4, 8)), "z": r.normal(size=(5, 4, 8)) * 2,
                                              "w": 1 + 0.1 * r.normal(size=8)}, {"eps": EPS}),
        "causal_conv1d_silu": ("causal_conv1d_silu", {"x": r.normal(size=(6, 10)), "w": r.normal(size=(10, 4)),
                                                      "state": r.normal(size=(3, 10))}, {}),
        "deltanet_gates": ("deltanet_gates", {"b": r.normal(size=(6, 4)) * 3, "a": r.normal(size=(6, 4)) * 10,
                                              "A_log": np.log(r.uniform(0.01, 16, 4)), "dt_bias": r.normal(size=4)}, {}),
    }
    T, Hv, dk, dv = 70, 4, 8, 6
    q = L.l2norm(r.normal(size=(T, Hv, dk))) * dk ** -0.5
    out["delta_rule"] = ("delta_rule_recurrent", {
        "q": q, "k": L.l2norm(r.normal(size=(T, Hv, dk))), "v": r.normal(size=(T, Hv, dv)),
        "g": -r.uniform(0, 1, size=(T, Hv)), "beta": r.uniform(0, 1, size=(T, Hv)),
        "state": r.normal(size=(Hv, dk, dv))}, {})
    out["gated_deltanet_prefill"] = ("gated_deltanet", _deltanet_inputs(r, 9, state=False), {"n_k_heads": 2, "eps": EPS})
    out["gated_deltanet_continue"] = ("gated_deltanet", _deltanet_inputs(r, 67), {"n_k_heads": 2, "eps": EPS})
    out["gated_deltanet_decode"] = ("gated_deltanet", _deltanet_inputs(r, 1), {"n_k_heads": 2, "eps": EPS})
    rope = {"rotary_dim": 8, "theta": 10000.0, "mrope_section": [2, 1, 1], "interleaved": True}
    pos = np.stack([np.arange(7), np.arange(7) + 3, np.arange(7) * 2]).astype(np.int64)
    out["rope"] = ("rope", {"positions": pos, "x": r.normal(size=(7, 2, 16))}, {"rope": rope})
    attn = {"n_heads": 4, "n_kv_heads": 2, "eps": EPS, "rope": rope}
    out["gated_attention_prefill"] = ("gated_attention", _attention_inputs(r, 6, 0), attn)
    out["gated_attention_continue"] = ("gated_attention", _attention_inputs(r, 3, 5), attn)
    out["sparse_moe"] = ("sparse_moe", _moe_inputs(r), {"k": 3})
    H = 16
    out["mtp_input"] = ("mtp_input", {"embeds": r.normal(size=(4, H)), "hidden": r.normal(size=(4, H)),
                                      "norm_embedding": 0.1 * r.normal(size=H), "norm_hidden": 0.1 * r.normal(size=H),
                                      "fc": r.normal(size=(H, 2 * H)) / np.sqrt(2 * H)}, {"eps": EPS})
    return out


def evaluate(function: str, a: dict, s: dict) -> dict[str, np.ndarray]:
    """Run ref.layers on one case (f64) -> named outputs."""
    if function == "rms_norm":
        return {"y": L.rms_norm(a["x"], a["w"], s["eps"])}
    if function == "gated_rms_norm":
        return {"y": L.gated_rms_norm(a["x"], a["z"], a["w"], s["eps"])}
    if function == "causal_conv1d_silu":
        y, st = L.causal_conv1d_silu(a["x"], a["w"], a["state"])
        return {"y": y, "state": st}
    if function == "deltanet_gates":
        beta, g = L.deltanet_gates(a["b"], a["a"], a["A_log"], a["dt_bias"])
        return {"beta": beta, "g": g}
    if function == "delta_rule_recurrent":
        o, st = L.delta_rule_recurrent(a["q"], a["k"], a["v"], a["g"], a["beta"], a["state"])
        return {"o": o, "state": st}
    if function == "gated_deltanet":
        prm = L.DeltaNetParams(*(a[n] for n in L.DeltaNetParams._fields))
        state = L.DeltaNetState(a["conv_state"], a["recurrent_state"]) if "conv_state" in a else None
        y, st = L.gated_deltanet(a["x"], prm, s["n_k_heads"], s["eps"], state)
        return {"y": y, "conv_state": st.conv, "recurrent_state": st.recurrent}
    if function == "rope":
        cos, sin = L.rope_cos_sin(a["positions"], _rope(s["rope"]))
        return {"cos": cos, "sin": sin, "y": L.apply_rope(a["x"], cos, sin)}
    if function == "gated_attention":
        prm = L.AttentionParams(*(a[n] for n in L.AttentionParams._fields))
        cache = L.KVCache(a["cache_k"], a["cache_v"]) if "cache_k" in a else None
        y, kv = L.gated_attention(a["x"], prm, s["n_heads"], s["n_kv_heads"], a["positions"], _rope(s["rope"]),
                                  s["eps"], cache)
        return {"y": y, "k": kv.k, "v": kv.v}
    if function == "sparse_moe":
        shared = L.SharedExpertParams(a["shared_gate_proj"], a["shared_up_proj"], a["shared_down_proj"],
                                      a["shared_expert_gate"])
        expert = lambda e, x: L.swiglu(x, a["experts_gate"][e], a["experts_up"][e], a["experts_down"][e])
        y, logits, ids, w = L.sparse_moe(a["x"], a["router"], s["k"], expert, shared)
        return {"y": y, "router_logits": logits, "topk_ids": ids, "topk_weights": w}
    if function == "mtp_input":
        return {"y": L.mtp_input(a["embeds"], a["hidden"], a["norm_embedding"], a["norm_hidden"], a["fc"], s["eps"])}
    raise ValueError(f"unknown layer function {function!r}")


def _rope(d: dict) -> L.Rope:
    return L.Rope(d["rotary_dim"], d["theta"], tuple(d["mrope_section"]), d["interleaved"])


def save_case(path: Path, function: str, inputs: dict, scalars: dict, outputs: dict) -> Path:
    """One vector file: inputs as in.<name>, expected outputs as out.<name>, function and scalars in
    the header metadata (the schema of spec/vectors/layers/README.md)."""
    tensors = {f"in.{k}": np.ascontiguousarray(v) for k, v in inputs.items()}
    tensors.update({f"out.{k}": np.ascontiguousarray(v) for k, v in outputs.items()})
    save_file(tensors, str(path), metadata={"function": function, "scalars": json.dumps(scalars, sort_keys=True)})
    return path


def write(directory: Path = DEFAULT_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return [save_case(directory / f"{name}.safetensors", function, inputs, scalars, evaluate(function, inputs, scalars))
            for name, (function, inputs, scalars) in cases().items()]


def read(path: Path) -> tuple[str, dict, dict, dict]:
    """-> (function, inputs, scalars, expected outputs) of one vector file."""
    from safetensors import safe_open
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    inputs = {k[3:]: v for k, v in tensors.items() if k.startswith("in.")}
    outputs = {k[4:]: v for k, v in tensors.items() if k.startswith("out.")}
    return meta["function"], inputs, json.loads(meta["scalars"]), outputs


def vectors_main(prog: str, description: str, write_to, default_dir: Path, argv=None) -> int:
    """The generators' CLI: `python -m PROG [--out DIR]` writes every case, one path per line on stderr."""
    ap = argparse.ArgumentParser(prog=f"python -m {prog}", description=description)
    ap.add_argument("--out", type=Path, default=default_dir)
    for path in write_to(ap.parse_args(argv).out):
        print(path, file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return vectors_main("ref.layer_vectors", __doc__.splitlines()[0], write, DEFAULT_DIR, argv)


if __name__ == "__main__":
    sys.exit(main())

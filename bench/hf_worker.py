"""Hugging Face transformers' side of bench/vs_transformers.py: a worker process that runs the
checkpoint's text model in transformers eager, float32, with the routed experts dequantized by
ref.nvfp4 to float32 (transformers' grouped_mm experts), answering one JSON request per line.

It runs in a separate virtual environment holding torch and transformers (bench-only dependencies,
never installed with this project), with the repository root on PYTHONPATH for ref (numpy,
ml_dtypes and safetensors needed there too):

    python3 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install torch==2.13.0 transformers ml_dtypes safetensors

Requests (stdin, one JSON object a line; answers on stdout the same way):
    {"op": "logits", "tokens": [[...]], "out": PATH}   all positions' logits [B, T, V] saved to PATH (.npy)
                                                        and the greedy token after them -> {"next": [...]}
    {"op": "prefill", "tokens": [[...]]}               one timed prefill (cache built, last logits) -> {"s": seconds}
    {"op": "decode", "tokens": [[...]], "steps": n, "out": PATH}
                                                        prefill (untimed), then n greedy decode steps timed
                                                        -> {"s": seconds of the n steps}; the first step's
                                                        logits [B, V] saved to PATH when given
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np


def load_model(model_dir: str):
    """Qwen3_5MoeForCausalLM (float32, eager attention, grouped_mm experts) with the checkpoint's text weights."""
    import torch
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeForCausalLM

    from ref.checkpoint import DenseWeight, NVFP4Weight, open_checkpoint
    from ref.nvfp4 import dequantize

    ck = open_checkpoint(model_dir)
    raw = json.loads((ck.directory / "config.json").read_text())
    text = dict(raw.get("text_config", raw))
    text.pop("model_type", None)
    text.pop("dtype", None)
    cfg = Qwen3_5MoeTextConfig(**text)
    cfg._experts_implementation = "grouped_mm"
    cfg._attn_implementation = "eager"
    t, prefix = ck.config.text, ck.config.text_prefix

    def matrix(module: str) -> np.ndarray:
        w = ck.linear(module)
        if isinstance(w, NVFP4Weight):
            return dequantize(w.packed, w.weight_scale, w.weight_scale_2)
        if not isinstance(w, DenseWeight):
            raise SystemExit(f"hf_worker: {module}: {type(w).__name__} not supported")
        return np.asarray(w.weight, np.float32)

    state = {}
    for name in ck.names():
        if not name.startswith(prefix + "layers.") and name not in (prefix + "embed_tokens.weight", prefix + "norm.weight",
                                                                     "lm_head.weight"):
            continue
        if ".mlp.experts." in name:
            continue
        key = "model." + name[len(prefix):] if name.startswith(prefix) else name
        if name.endswith(".weight") and ck.has(name[:-len(".weight")] + ".weight_scale"):
            state[key] = matrix(name[:-len(".weight")])
        elif not name.endswith((".weight_scale", ".weight_scale_2", ".input_scale")):
            state[key] = np.asarray(ck.tensor(name), np.float32)
    for layer in range(t.num_hidden_layers):
        experts = [ck.expert(layer, e) for e in range(t.num_experts)]
        deq = lambda w: dequantize(w.packed, w.weight_scale, w.weight_scale_2) if isinstance(w, NVFP4Weight) \
            else np.asarray(w.weight, np.float32)
        state[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([deq(x.gate), deq(x.up)]) for x in experts])           # [E, 2I, H]
        state[f"model.layers.{layer}.mlp.experts.down_proj"] = np.stack([deq(x.down) for x in experts])  # [E, H, I]

    torch.set_default_dtype(torch.float32)
    model = Qwen3_5MoeForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
                                                strict=False)
    if missing or unexpected:
        raise SystemExit(f"hf_worker: missing {missing[:5]} unexpected {unexpected[:5]}")
    return model


def serve(model_dir: str) -> None:
    import torch
    import transformers

    model = load_model(model_dir)
    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        tokens = torch.tensor(req["tokens"], dtype=torch.long)
        with torch.inference_mode():
            if req["op"] == "logits":
                logits = model(input_ids=tokens).logits.float()
                np.save(req["out"], logits.numpy())
                ans = {"next": logits[:, -1].argmax(-1).tolist()}
            elif req["op"] == "prefill":
                t0 = time.perf_counter()
                out = model(input_ids=tokens, use_cache=True, logits_to_keep=1)
                out.logits[:, -1].argmax(-1).tolist()
                ans = {"s": time.perf_counter() - t0}
            elif req["op"] == "decode":
                out = model(input_ids=tokens, use_cache=True, logits_to_keep=1)
                cache, tok = out.cache, out.logits[:, -1].argmax(-1)
                t0 = time.perf_counter()
                for i in range(req["steps"]):
                    out = model(input_ids=tok[:, None], cache=cache, use_cache=True)
                    cache, tok = out.cache, out.logits[:, -1].argmax(-1)
                    tok.tolist()                                         # the host reads each step's tokens
                    if i == 0 and req.get("out"):
                        first = out.logits[:, -1].float().numpy()
                ans = {"s": time.perf_counter() - t0}
                if req.get("out"):
                    np.save(req["out"], first)
            else:
                raise SystemExit(f"hf_worker: unknown op {req['op']!r}")
        print(json.dumps(ans), flush=True)


if __name__ == "__main__":
    serve(sys.argv[1])

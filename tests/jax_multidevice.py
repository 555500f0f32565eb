"""Run by tests/test_jax_sharded.py in a subprocess with 4 simulated CPU devices (XLA_FLAGS is set
before JAX starts): greedy generation on meshes of 2 and 4 devices, dense weights replicated or
sharded, f32 and bf16, each prompt alone (decode takes the one-token slot path) or all together
(the sorted-loop path), W4A16 or W4A4 with the layer-max input scale, plain or speculative decoding
with 2 MTP drafts; prints one JSON object with tokens, logits and the placed shardings.

    python tests/jax_multidevice.py CHECKPOINT_DIR PROMPTS_JSON STEPS CONTEXT
"""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxrun.load import load  # noqa: E402
from jaxrun.runner import Runner  # noqa: E402
from jaxrun.sharding import make_mesh  # noqa: E402

CONFIGS = [(2, "replicated", "f32", "alone", "w4a16", 0), (4, "replicated", "f32", "alone", "w4a16", 0),
           (4, "sharded", "f32", "together", "w4a16", 0), (4, "replicated", "f32", "alone", "w4a4", 0),
           (4, "sharded", "bf16", "together", "w4a16", 0), (4, "replicated", "f32", "together", "w4a16", 2)]


def main(ckpt_dir, prompts, steps, context):
    out = {"devices": len(jax.devices()), "runs": []}
    for n, dense, precision, batching, activations, speculative in CONFIGS:
        mesh = make_mesh(n)
        ckpt, params = load(ckpt_dir, mesh, precision, dense, progress=False)
        act_scale = "max" if activations == "w4a4" else "per-expert"
        r = Runner(params, ckpt.config.text, mesh, precision, activations, act_scale)
        gen = lambda ps: r.generate(ps, steps, max_context=context, keep_logits=True, speculative=speculative)
        res = gen(prompts) if batching == "together" else [gen([p])[0] for p in prompts]
        placed = {jax.tree_util.keystr(p): [list(a.sharding.spec), list(a.addressable_shards[0].data.shape)]
                  for p, a in jax.tree_util.tree_flatten_with_path(r.params)[0]}
        out["runs"].append({"devices": n, "dense": dense, "precision": precision, "batching": batching,
                            "activations": activations, "act_scale": act_scale, "speculative": speculative,
                            "tokens": [x.token_ids for x in res],
                            "logits": [np.stack(x.logits).tolist() for x in res], "placed": placed,
                            "decode_traces": r.traces["verify" if speculative else "decode"]})
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))

"""Run by tests/test_jax_vision.py in a subprocess with 4 simulated CPU devices (XLA_FLAGS is set before
JAX starts): greedy generation of an image prompt (the sample image and a wide one) on a mesh of 4
devices with the dense weights tensor-parallel and the vision tower replicated; prints one JSON object
with the tokens, the logits and whether every vision parameter is whole on every device.

    python tests/jax_vision_multidevice.py CHECKPOINT_DIR PROMPT_JSON STEPS CONTEXT
"""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from jaxrun.load import load  # noqa: E402
from jaxrun.runner import Runner  # noqa: E402
from jaxrun.sharding import make_mesh  # noqa: E402
from ref.image import SAMPLE_IMAGE, preprocess  # noqa: E402


def main(ckpt_dir, prompt, steps, context):
    mesh = make_mesh(4)
    ckpt, params = load(ckpt_dir, mesh, "f32", "sharded", progress=False)
    pp = ckpt.config.preprocessor
    images = [preprocess(SAMPLE_IMAGE, pp), preprocess(Image.new("RGB", (300, 40), (10, 200, 30)), pp)]
    r = Runner(params, ckpt.config, mesh, "f32")
    res = r.generate([prompt], steps, max_context=context, keep_logits=True, mtp=True, images=[images])[0]
    whole = all(a.sharding.is_fully_replicated for a in jax.tree.leaves(r.params.visual))
    print(json.dumps({"devices": len(jax.devices()), "visual_replicated": whole, "tokens": res.token_ids,
                      "logits": np.stack(res.logits).tolist()}))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))

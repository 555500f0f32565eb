"""jaxrun as a reference backend of ref.crosscheck (`--backend jax`), registered through the entry-point
group "qwen35_nvfp4_spec.reference_backends" (pyproject.toml), so ref never imports jaxrun."""
from __future__ import annotations

from dataclasses import asdict

import numpy as np

from jaxrun.load import load
from jaxrun.runner import Prefill, Runner, bucket
from jaxrun.sharding import make_mesh
from ref.errors import FormatError
from ref.modes import JAX_PRECISIONS, Modes


def reference_logits(ckpt, token_ids: list[int], modes: Modes, want_dumps: bool, images=()):
    """Teacher-forced logits [T, V] float64 of one prefill over all devices JAX sees (jaxrun computes in
    f32 or bf16, W4A16 or W4A4), and no layer dumps: -> (logits, None). images: the prompt's images
    (ref.image.PreprocessedImage), encoded by jaxrun's own encoder."""
    if modes.precision not in JAX_PRECISIONS:
        raise FormatError(f"--backend jax runs --precision {' or '.join(JAX_PRECISIONS)}, not {modes.precision}; "
                          f"use --backend ref")
    if want_dumps:
        raise FormatError("--engine-dumps needs --backend ref (jaxrun writes no layer dumps)")
    mesh = make_mesh()
    jck, params = load(str(ckpt.directory), mesh, modes.precision, progress=False)
    runner = Runner(params, jck.config, mesh, **asdict(modes))
    T = len(token_ids)
    if images:                                                      # one prefill of the image prompt, every row kept
        job = Prefill(runner, [list(token_ids)], bucket(T), all_logits=True, images=[list(images)])
        while not job.advance():
            pass
        return np.concatenate(job.prompt_logits, axis=1)[0].astype(np.float64), None
    tokens = np.zeros((1, bucket(T)), np.int32)                     # right-padded to jaxrun's shape bucket
    tokens[0, :T] = token_ids
    logits, _ = runner.prefill(tokens, np.array([T], np.int32), max_len=tokens.shape[1], all_logits=True)
    return np.asarray(logits[0, :T], np.float64), None

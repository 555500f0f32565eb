"""jaxrun as a reference backend of ref.crosscheck (`--backend jax`), registered through the entry-point
group "qwen35_nvfp4_spec.reference_backends" (pyproject.toml), so ref never imports jaxrun.

Over several processes (ref.crosscheck's --coordinator / --num-processes / --process-id or
--distributed auto, which it passes on through the environment, read here by
jaxrun.distributed.Settings): every process runs the same prefill on process 0's token ids; process 0
returns the logits to ref.crosscheck, which reports; the others have only lent their devices, and
end (exit status 0) once the logits are computed.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np

from jaxrun.distributed import Cluster, Settings, fingerprint
from jaxrun.load import load                      # imports jax: without it, ref.crosscheck says "unavailable"
from jaxrun.runner import Prefill, Runner, bucket
from jaxrun.sharding import check_experts, make_mesh
from ref.errors import FormatError
from ref.modes import JAX_PRECISIONS, Modes

PROG = "ref.crosscheck"


def reference_logits(ckpt, token_ids: list[int], modes: Modes, want_dumps: bool, images=()):
    """Teacher-forced logits [T, V] float64 of one prefill over all devices JAX sees (jaxrun computes in
    f32 or bf16, W4A16 or W4A4), and no layer dumps: -> (logits, None). images: the prompt's images
    (ref.image.PreprocessedImage), encoded by jaxrun's own encoder."""
    if modes.precision not in JAX_PRECISIONS:
        raise FormatError(f"--backend jax runs --precision {' or '.join(JAX_PRECISIONS)}, not {modes.precision}; "
                          f"use --backend ref")
    if want_dumps:
        raise FormatError("--engine-dumps needs --backend ref (jaxrun writes no layer dumps)")
    cluster = Cluster.start(Settings.resolve(), PROG)
    with cluster.guard():
        logits = _logits(cluster, ckpt, token_ids, modes, images)
    if not cluster.leader:
        sys.stderr.flush()
        os._exit(0)
    return logits, None


def _logits(cluster, ckpt, token_ids: list[int], modes: Modes, images) -> np.ndarray:
    """The logits [T, V] float64; images are each process's own (read from the same files)."""
    def prepare():
        mesh = make_mesh()
        check_experts(ckpt.config.text.num_experts, mesh.size)
        return mesh

    mesh = cluster.agree(prepare, lambda _: fingerprint(dataclasses.asdict(modes), ckpt))
    token_ids = cluster.broadcast(list(map(int, token_ids)))          # process 0's, on every process
    jck, params = load(str(ckpt.directory), mesh, modes.precision, progress=False)
    runner = Runner(params, jck.config, mesh, **dataclasses.asdict(modes))
    T = len(token_ids)
    if images:                                                      # one prefill of the image prompt, every row kept
        job = Prefill(runner, [list(token_ids)], bucket(T), all_logits=True, images=[list(images)])
        while not job.advance():
            pass
        logits = np.concatenate(job.prompt_logits, axis=1)[0].astype(np.float64)
    else:
        tokens = np.zeros((1, bucket(T)), np.int32)                 # right-padded to jaxrun's shape bucket
        tokens[0, :T] = token_ids
        logits, _ = runner.prefill(tokens, np.array([T], np.int32), max_len=tokens.shape[1], all_logits=True)
        logits = np.asarray(logits[0, :T], np.float64)
    cluster.finish()
    return logits

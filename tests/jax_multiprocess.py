"""Run by tests/test_jax_multiprocess.py twice: as one process with 4 simulated CPU devices, and under
`python -m jaxrun.launch -n 2 --devices-per-process 2` (2 processes x 2 devices, one 4-device mesh).
Generates with the same prompts in every configuration that matters to the mesh: dense weights
replicated (greedy and seeded sampling, plain and speculative with 2 MTP drafts; then the same
parameters read from the fused expert layout) and tensor-parallel within a host (greedy). Process 0
prints one JSON object: per run the tokens and f32 logits; the checkpoint bytes each process read;
per compiled function, the collectives that cross processes (jaxrun.collectives).

    python tests/jax_multiprocess.py CHECKPOINT_DIR FUSED_CHECKPOINT_DIR PROMPTS_JSON STEPS CONTEXT
"""
import json
import sys

import numpy as np

from jaxrun.distributed import Cluster, Settings
from jaxrun.sampling import Sampling

GREEDY, SEEDED = Sampling(), Sampling(temperature=0.8, top_p=0.9, top_k=50, seed=7)


def main(ckpt_dir, fused_dir, prompts, steps, context):
    cluster = Cluster.start(Settings.resolve(), "jax_multiprocess")
    with cluster.guard():
        out = _runs(cluster, ckpt_dir, fused_dir, prompts, steps, context)
    cluster.finish()
    print(json.dumps(out))


def _runs(cluster, ckpt_dir, fused_dir, prompts, steps, context):
    import jax
    from jaxrun.collectives import cross_process
    from jaxrun.load import BytesRead, load
    from jaxrun.runner import Runner
    from jaxrun.sharding import make_mesh

    mesh = make_mesh()
    out = {"processes": jax.process_count(), "devices": mesh.size, "mesh": dict(mesh.shape), "runs": []}
    long = list(range(2000))                                 # past HEADER_BYTES: a second collective
    out["broadcast"] = [cluster.broadcast({"a": 1} if cluster.leader else None),
                        cluster.broadcast(long if cluster.leader else None) == long]
    out["gathered"] = [len(x) for x in cluster.gather("x" * (10 + 3000 * cluster.index))]

    def record(runner, name, sampling, speculative=0):
        res = runner.generate(prompts, steps, sampling, max_context=context, keep_logits=True,
                              speculative=speculative)
        out["runs"].append({"name": name, "tokens": [r.token_ids for r in res],
                            "logits": [np.stack(r.logits).tolist() for r in res]})

    count = BytesRead()
    ckpt, params = load(ckpt_dir, mesh, "f32", "replicated", progress=False, count=count)
    out["bytes_read"] = cluster.gather(count.total)
    r = Runner(params, ckpt.config.text, mesh, "f32")
    record(r, "greedy", GREEDY)
    record(r, "seeded", SEEDED)
    record(r, "greedy speculative", GREEDY, 2)
    record(r, "seeded speculative", SEEDED, 2)
    r.set_params(load(fused_dir, mesh, "f32", "replicated", progress=False)[1])
    record(r, "fused greedy", GREEDY)
    record(r, "fused seeded", SEEDED)
    ckpt, params = load(ckpt_dir, mesh, "f32", "sharded", progress=False)
    tp = Runner(params, ckpt.config.text, mesh, "f32")
    record(tp, "dense sharded greedy", GREEDY)
    out["cross_process"] = {f"{dense} {key[0]} {key[1:-1]}": [[c.op, c.shape, len(c.groups[0])] for c in
                                                             cross_process(fn.as_text(), mesh)]
                            for dense, runner in (("replicated", r), ("sharded", tp))
                            for key, fn in runner._compiled.items()}
    return out


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))

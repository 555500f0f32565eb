"""python -m jaxrun.serve: an OpenAI-compatible server (FastAPI on uvicorn) over the sharded JAX runner,
with continuous batching (jaxrun.scheduler), so that clients, eval harnesses and `ref.crosscheck
--server` can use jaxrun like an engine.

    python -m jaxrun.serve                                   # built-in tiny synthetic model, 127.0.0.1:8000
    python -m jaxrun.serve --model DIR|REPO [--host H] [--port P] [--devices N] [--max-running-requests B]
        [--max-context N] [--prefill-chunk C] [--engine-profile NAME] [--precision f32|bf16]
        [--activations w4a16|w4a4] [--act-scale per-expert|max] [--kv-cache-dtype auto|fp8_e4m3|nvfp4]
        [--kv-engine vllm|sglang] [--kv-prefill cache|fresh] [--state-dtype float32|bfloat16]
        [--speculative [K]] [--served-model-name NAME]
    python -m jaxrun.serve --list-profiles

--engine-profile NAME serves under the modes an engine configuration runs (ref.profiles), so a client
can compare jaxrun with that engine; the mode flags given override its fields.

Endpoints: POST /v1/completions and /v1/chat/completions (streaming, logprobs, vLLM's prompt_logprobs
and return_tokens_as_token_ids, reasoning_content, qwen3_coder tool calls, images as image_url content
parts with base64 data URLs when the checkpoint has a vision tower), GET /v1/models, /health
(200 once the model is loaded and its first steps compiled), /metrics (Prometheus). A checkpoint
without a tokenizer serves token-id prompts only. SIGINT / SIGTERM: stop admitting, finish the requests
in flight, exit 0 (a second signal exits at once). Bad flags or an unreadable model: one line, exit 2.

Over several processes (--coordinator / --num-processes / --process-id, --distributed auto, or
`python -m jaxrun.launch -n N -- jaxrun.serve ...`): process 0 serves HTTP and schedules; before each
turn its plan reaches the others, which run the same steps on the same slots until process 0 stops.
"""
from __future__ import annotations

if __name__ == "__main__":  # before any library starts a thread: threads inherit the blocked signals
    from ref.cli import exit_on_interrupt
    exit_on_interrupt("jaxrun.serve")

import os
import sys
from dataclasses import asdict

from ref.cli import ArgumentParser, HelpFormatter, UsageError, run_main
from ref.distributed_args import add_distributed_arguments
from ref.modes import DENSE_LAYOUTS, JAX_PRECISIONS, add_mode_arguments, modes_from_args

PROG = "jaxrun.serve"


def parse_args(argv):
    p = ArgumentParser(prog=f"python -m {PROG}", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", help="checkpoint directory or hub id (default: built-in tiny synthetic model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--devices", type=int, help="devices in the mesh: 1, 2, 4 or 8, dividing the number of experts "
                   "(default: all visible; on CPU, that many simulated devices)")
    p.add_argument("--dense", choices=DENSE_LAYOUTS, default="replicated",
                   help="dense weights replicated on every device or tensor-parallel (default replicated)")
    p.add_argument("--max-running-requests", type=int, default=8, metavar="B",
                   help="decode slots: requests generating at once; the others wait (default 8)")
    p.add_argument("--max-context", type=int, default=4096,
                   help="cache positions per request: prompt + max_tokens must fit (default 4096)")
    p.add_argument("--prefill-chunk", type=int, default=256, metavar="C",
                   help="prompt tokens prefilled per scheduler turn, between decode steps (default 256)")
    add_mode_arguments(p, JAX_PRECISIONS, default_precision=None)
    p.add_argument("--speculative", nargs="?", const=1, type=int, metavar="K",
                   help="speculative decoding with K MTP drafts per step (default 1)")
    p.add_argument("--served-model-name", help="the model name clients send (default: the --model argument, or "
                   "'jaxrun-tiny')")
    p.add_argument("--compile-cache", metavar="DIR|off",
                   help="where compiled steps are kept for later runs (default: $JAX_COMPILATION_CACHE_DIR, "
                        "else $XDG_CACHE_HOME/qwen35-nvfp4-spec/xla); off: compile every run")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default info)")
    add_distributed_arguments(p)
    return p.parse_args(argv)


def validate(a) -> None:
    if not 0 < a.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {a.port}")
    if a.max_running_requests < 1:
        raise UsageError(f"--max-running-requests must be >= 1, got {a.max_running_requests}")
    if a.prefill_chunk < 1:
        raise UsageError(f"--prefill-chunk must be >= 1, got {a.prefill_chunk}")
    if a.speculative is not None and a.speculative < 1:
        raise UsageError(f"--speculative K must be >= 1, got {a.speculative}")
    if a.devices is not None and a.devices not in (1, 2, 4, 8):
        raise UsageError(f"--devices must be 1, 2, 4 or 8, got {a.devices}")
    if a.max_context < 16 + 2 * (a.speculative or 0):
        raise UsageError(f"--max-context {a.max_context} is too small")


def _listen(host: str, port: int):
    """The listening socket, bound before anything is loaded (a port in use fails at once)."""
    import socket
    try:
        sock = socket.create_server((host, port), reuse_port=False)
    except OSError as e:
        raise UsageError(f"--host {host} --port {port}: cannot listen ({e.strerror or e})") from None
    return sock


def run(a) -> int:
    validate(a)
    from jaxrun.distributed import run_in_cluster
    return run_in_cluster(a, PROG, _run)


def _run(a, cluster) -> int:
    import jax
    from jaxrun.distributed import fingerprint
    from jaxrun.load import BytesRead, bytes_summary, load
    from jaxrun.openai_protocol import generation_defaults
    from jaxrun.options import default_precision
    from jaxrun.runner import Runner
    from jaxrun.scheduler import Scheduler
    from jaxrun.server import build_app, run_server
    from jaxrun.sharding import check_experts, make_mesh
    from ref.checkpoint import open_checkpoint
    from ref.synth import cached_checkpoint, user_cache
    from ref.tokenizer import load_tokenizer

    if a.compile_cache != "off":
        jax.config.update("jax_compilation_cache_dir", a.compile_cache or os.environ.get("JAX_COMPILATION_CACHE_DIR")
                          or str(user_cache("xla")))
    modes = modes_from_args(a, default_precision())
    precision = modes.precision

    def prepare():
        sock = _listen(a.host, a.port) if cluster.leader else None   # only process 0 serves HTTP
        ckpt = open_checkpoint(a.model or cached_checkpoint("tiny"))
        if a.speculative and not ckpt.has("mtp.fc.weight"):
            raise UsageError(f"--speculative: {ckpt.directory} has no MTP head (mtp.fc.weight)")
        if modes.activations == "w4a4" and ckpt.expert_input_scales(0) is None:
            raise UsageError("--activations w4a4: the checkpoint's routed experts are not NVFP4 with input scales")
        mesh = make_mesh(a.devices)
        check_experts(ckpt.config.text.num_experts, mesh.size)
        return sock, ckpt, mesh

    sock, ckpt, mesh = cluster.agree(prepare, lambda r: fingerprint(a, r[1], modes=asdict(modes)))
    cfg = ckpt.config.text
    tok = load_tokenizer(ckpt.directory) if (ckpt.directory / "tokenizer.json").is_file() else None
    context = min(a.max_context, cfg.max_position_embeddings)
    where = cluster.where(mesh)
    say = (lambda msg: print(f"{PROG}: {msg}", file=sys.stderr, flush=True)) if cluster.leader else (lambda msg: None)
    say(f"loading {ckpt.directory} on {where}, {modes.describe()}")
    count = BytesRead()
    _, params = load(str(ckpt.directory), mesh, precision, a.dense, progress=False, count=count)
    runner = Runner(params, ckpt.config, mesh, **asdict(modes))
    bytes_read = cluster.gather(count.total)
    say(f"compiling ({a.max_running_requests} slots, context {context}); read {bytes_summary(bytes_read)}")
    engine = Scheduler(runner, a.max_running_requests, context, a.speculative or 0, a.prefill_chunk, cluster)
    if not cluster.leader:
        engine.follow()                                  # until process 0's server stops
        cluster.finish()
        return 0
    engine.start()
    name = a.served_model_name or a.model or "jaxrun-tiny"
    images = runner.has_vision and ckpt.config.preprocessor is not None
    app = build_app(engine, tok, name, eos_token_ids=cfg.eos_token_ids,
                    default_sampling=generation_defaults(ckpt.directory),
                    preprocessor=ckpt.config.preprocessor if images else None,
                    image_token_id=ckpt.config.special_tokens.get("image_token_id") if images else None)
    say(f"serving {name!r} on http://{a.host}:{a.port} (compiled in {runner.timings.compile_s:.1f} s)")
    status = run_server(app, a.host, a.port, log_level=a.log_level, sockets=[sock])
    cluster.finish()
    return status


def main(argv=None) -> int:
    return run_main(PROG, lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

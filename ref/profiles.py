"""Engine profiles: the numerical modes (ref.modes.Modes) that one engine configuration runs, by name.

A profile bundles what an engine decides for itself: compute precision, whether the quantized
linears' inputs are quantized (W4A4 / W8A8) and with which routed-expert input scale, the KV-cache
dtype and whose store rule, which K/V a prefill attends to, and the DeltaNet state dtype. Each one
says where its settings come from (engine files, flags, PRs: spec/model.md §10 and spec/nvfp4.md
§10-13 give the rules). `--engine-profile NAME` selects one on every CLI that takes modes (explicit
flags override its fields); `--list-profiles` prints them; `ref.crosscheck --fit-profiles` runs the
reference under each and says which one explains an engine.

Thresholds: each profile carries the bounds within which an engine that runs exactly that profile
passes ref.crosscheck against the reference run under the same profile. They are sized by how far
bf16 arithmetic moves a faithful engine, measured as the brief of issue 15 asks: the "engine" is
ref.model in bf16 under the profile, the reference ref.model in float64 under the same profile, on
the tiny synthetic checkpoints (the default ModelOpt one and the modelopt-mixed variant, which has
FP8 linears and KV scales), random prompts of T = 16, 48, 80 and 150 tokens, 3 seeds each (24 runs),
every metric of the verdict: mean and worst-position KL over the full vocabulary, top-1 agreement,
and the local error of each kind of dumped step (attention and DeltaNet mixers, MoE blocks, the
head, and the steps whose GEMMs quantize their inputs, which a bf16 engine and a float64 reference
quantize differently). Each bound is the worst value seen times 1.5, rounded up to two digits; top-1
is the worst minus 0.1. `python bench/profile_thresholds.py` repeats the measurement and prints them;
tests/test_profiles.py re-measures a few runs and checks they stay inside with the margin. Since a
faithful engine is at most about as far from the bf16 emulation as bf16 is from float64, the same
bounds serve when the reference runs at the profile's own precision (ref.crosscheck's default with a
profile). On the tiny random model W4A4 is chaotic (a flipped NVFP4 code moves a whole block), so the
logit bounds of the W4A4 profiles are loose; the local step bounds of unquantized steps stay tight,
which is where the injected bugs are caught (tests/test_crosscheck_engines.py).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from ref.compare import Thresholds
from ref.errors import FormatError
from ref.modes import Modes


@dataclass(frozen=True)
class Profile:
    name: str
    modes: Modes
    engine: str           # the engine configuration, in a line
    source: str           # where each setting comes from
    thresholds: Thresholds = Thresholds()


def _p(name, engine, source, thresholds, **modes) -> Profile:
    return Profile(name, Modes(**modes), engine, source, thresholds)


def _measured(max_kl, max_kl_pos, min_top1, **steps) -> Thresholds:
    """Thresholds as bench/profile_thresholds.py prints them; steps: kind=(whole tensor, worst token)."""
    bounds = tuple((kind, *b) for kind, b in sorted(steps.items()))
    return Thresholds(max_kl, max_kl_pos, min_top1, max(b[1] for b in bounds), max(b[2] for b in bounds),
                      steps=bounds)


_W4A16 = _measured(0.019, 0.56, 0.83, attention=(0.0031, 0.0043), deltanet=(0.013, 0.064), head=(0.0026, 0.0033),
                   moe=(0.0051, 0.015))
_W4A4_STEPS = dict(deltanet=(0.0081, 0.047), head=(0.0027, 0.0035), quantized=(0.05, 0.28))
_W4A4_MAX = _measured(0.29, 4.7, 0.52, attention=(0.003, 0.0042), **_W4A4_STEPS)
_W4A4_FP8KV = _measured(0.3, 4.7, 0.46, attention=(0.0067, 0.016), **_W4A4_STEPS)
_W4A4_NVFP4KV = _measured(0.3, 4.7, 0.46, attention=(0.016, 0.066), **_W4A4_STEPS)
_W4A4_PER_EXPERT = _measured(0.35, 2.5, 0.52, attention=(0.003, 0.0042), **_W4A4_STEPS | dict(deltanet=(0.0091, 0.047)))

PROFILES: dict[str, Profile] = {p.name: p for p in (
    _p("hf-bf16", "Hugging Face transformers in bfloat16, the numerics oracle the engines are tested against",
       "transformers models/qwen3_5_moe/modeling_qwen3_5_moe.py: bf16 activations where its bf16 path rounds "
       "(spec/model.md §6), DynamicCache keeps K/V in bf16, the DeltaNet state in float32 (config "
       "mamba_ssm_dtype); quantized weights dequantized (W4A16, FP8 linears W8A16)",
       _W4A16, precision="bf16"),
    _p("marlin-w4a16", "vLLM / SGLang on GPUs without FP4 tensor cores (Marlin), tpu-inference: NVFP4 and FP8 "
       "weights dequantized, bf16 activations, bf16 KV cache",
       "vLLM vllm/model_executor/layers/quantization/utils/marlin_utils_fp4.py (ModelOpt NVFP4 linears and MoE "
       "fall back to Marlin below compute capability 10.0) and marlin_utils_fp8.py (FP8 weight-only); "
       "tpu-inference dequantizes NVFP4 (W4A16)",
       _W4A16, precision="bf16"),
    _p("vllm-blackwell", "vLLM on Blackwell: --quantization modelopt_fp4, FlashInfer TRT-LLM/CUTLASS MoE, bf16 KV",
       "vLLM vllm/model_executor/layers/quantization/modelopt.py ModelOptNvFp4FusedMoE: the FlashInfer backends "
       "share one activation scale, w13_input_scale.max() over all experts (act_scale max); NVFP4 and FP8 dense "
       "linears quantize their inputs (scaled_fp4_quant / static scaled_fp8_quant: W4A4, W8A8)",
       _W4A4_MAX, precision="bf16", activations="w4a4", act_scale="max"),
    _p("vllm-blackwell-fp8kv", "vllm-blackwell with --kv-cache-dtype fp8 (fp8_e4m3)",
       "as vllm-blackwell; KV store csrc/quantization/w8a8/fp8/nvidia/quant_utils.cuh scaled_vec_conversion "
       "(fp32 x / scale, saturating) called by reshape_and_cache_flash; every attention backend reads the "
       "cache after writing it, prefill included (kv_prefill cache); scales from k_proj.k_scale / "
       "v_proj.v_scale (vllm/model_executor/layers/quantization/kv_cache.py)",
       _W4A4_FP8KV, precision="bf16", activations="w4a4", act_scale="max", kv_cache_dtype="fp8_e4m3"),
    _p("vllm-blackwell-nvfp4kv", "vllm-blackwell with --kv-cache-dtype nvfp4 (the configuration of vllm#55673)",
       "as vllm-blackwell; KV store csrc/libtorch_stable/nvfp4_kv_cache_kernels.cu "
       "reshape_and_cache_nvfp4_kernel (blocks of 16 along head_dim, E4M3 block scales, global 1/kv_scale; "
       "vLLM PR #40177), read back through the cache",
       _W4A4_NVFP4KV, precision="bf16", activations="w4a4", act_scale="max", kv_cache_dtype="nvfp4"),
    _p("vllm-blackwell-cutlass", "vLLM on Blackwell with its own CUTLASS NVFP4 MoE backend, bf16 KV",
       "vLLM modelopt.py ModelOptNvFp4FusedMoE: the vLLM-CUTLASS MoE backend keeps per-expert activation "
       "scales (w13_input_scale max over gate/up only; act_scale per-expert)",
       _W4A4_PER_EXPERT, precision="bf16", activations="w4a4", act_scale="per-expert"),
    _p("sglang-fp8kv", "the model card's SGLang command: --quantization modelopt_fp4 --kv-cache-dtype fp8_e4m3 "
       "on Blackwell, FlashInfer attention and flashinfer_trtllm MoE",
       "SGLang python/sglang/srt/layers/quantization/modelopt_quant.py: FlashInfer MoE takes "
       "w13_input_scale.max() (act_scale max); KV store python/sglang/srt/mem_cache/memory_pool.py "
       "MHATokenToKVPool.set_kv_buffer (bf16 divide, torch cast: kv_engine sglang); "
       "python/sglang/srt/layers/attention/flashinfer_backend.py forward_extend: text-only prefill attends "
       "to the chunk's own K/V unquantized (ragged, kv_prefill fresh), decode reads the cache; "
       "--mamba-ssm-dtype unset: the config's mamba_ssm_dtype float32",
       _W4A4_MAX, precision="bf16", activations="w4a4", act_scale="max", kv_cache_dtype="fp8_e4m3",
       kv_engine="sglang", kv_prefill="fresh"),
    _p("sglang-fp8kv-bf16state", "sglang-fp8kv with --mamba-ssm-dtype bfloat16",
       "as sglang-fp8kv; python/sglang/srt/server_args.py --mamba-ssm-dtype: the recurrent-state pool dtype, "
       "written back after every forward call (hybrid_linear_attn_backend.py GDNAttnBackend)",
       _W4A4_MAX, precision="bf16", activations="w4a4", act_scale="max", kv_cache_dtype="fp8_e4m3",
       kv_engine="sglang", kv_prefill="fresh", state_dtype="bfloat16"),
)}


def get_profile(name: str) -> Profile:
    """The profile called `name`; FormatError naming the known ones otherwise."""
    if name not in PROFILES:
        raise FormatError(f"engine profile {name!r}: expected one of {list(PROFILES)}")
    return PROFILES[name]


def format_profiles() -> str:
    """Every profile: its name, the modes it sets (every field), what engine it is and its sources."""
    out = []
    for p in PROFILES.values():
        sets = " ".join(f"{f.name}={getattr(p.modes, f.name)}" for f in fields(Modes))
        th = p.thresholds
        steps = ", ".join(f"{kind} {r:g} ({t:g})" for kind, r, t in th.steps)
        out += [f"{p.name}", f"  sets:       {sets}", f"  engine:     {p.engine}", f"  source:     {p.source}",
                f"  thresholds: mean KL <= {th.max_kl:g}, KL at a position <= {th.max_kl_pos:g}, top-1 >= "
                f"{th.min_top1:g}; step error (worst token): {steps}"]
    return "\n".join(out)

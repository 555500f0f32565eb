"""config.json (+ hf_quant_config.json, preprocessor_config.json) -> one typed, immutable Config.

Accepts the vision-language wrapper (`text_config` / `vision_config` nested) and the flat text-only
form, RoPE settings from `rope_parameters` or the older top-level fields, quantization metadata
from `config.json["quantization_config"]` and/or `hf_quant_config.json`, and the image processor's
settings from `preprocessor_config.json` (or the `image_processor` object of `processor_config.json`).
Any missing or contradictory field raises ConfigError naming the file and field.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ref.errors import ConfigError

LINEAR, FULL = "linear_attention", "full_attention"
KNOWN_QUANT_ALGOS = ("NVFP4", "MIXED_PRECISION")
# config.json quantization_config.quant_method: ModelOpt writes "modelopt" (also for MIXED_PRECISION);
# NVIDIA's published "-V2" checkpoint says "modelopt_mixed"; llm-compressor writes "compressed-tensors".
QUANT_METHODS = ("modelopt", "modelopt_mixed", "compressed-tensors")
MIXED_ALGOS = ("FP8", "NVFP4")  # per-module algorithms of a MIXED_PRECISION checkpoint this project reads
CT_FORMAT = "nvfp4-pack-quantized"


@dataclass(frozen=True)
class TextConfig:
    hidden_size: int
    num_hidden_layers: int
    layer_types: tuple[str, ...]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, ...] = (11, 11, 10)
    mrope_interleaved: bool = True
    mtp_num_hidden_layers: int = 0
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def full_attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == FULL)

    @property
    def linear_key_dim(self) -> int:  # Hk * dk
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:  # Hv * dv
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:  # q ‖ k ‖ v channels of the depthwise conv
        return 2 * self.linear_key_dim + self.linear_value_dim


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    hidden_act: str = "gelu_pytorch_tanh"
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = ()
    rope_theta: float = 10_000.0  # 2-D axial RoPE of the vision attention

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# The defaults of transformers' Qwen2-VL image processor, used for any field the file leaves out.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3


@dataclass(frozen=True)
class PreprocessorConfig:
    """The image processor's settings (preprocessor_config.json). min/max_pixels bound the resized
    area; the file spells them `size.shortest_edge` / `size.longest_edge` (or, older, `min_pixels` /
    `max_pixels`, which win when both are given, as in transformers)."""
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    rescale_factor: float = 1 / 255
    resample: int = PIL_BICUBIC  # a Pillow resampling filter number
    do_rescale: bool = True
    do_normalize: bool = True

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size


@dataclass(frozen=True)
class QuantConfig:
    quant_algo: str
    group_size: int = 16
    exclude_modules: tuple[str, ...] = ()  # ModelOpt wildcards, or compressed-tensors names / "re:" patterns
    kv_cache_quant_algo: str | None = None
    producer: str = ""  # e.g. "modelopt 0.37.0", "compressed-tensors 0.12.2"
    method: str = "modelopt"  # one of QUANT_METHODS
    quantized_layers: tuple[tuple[str, str], ...] = ()  # MIXED_PRECISION: (module name or pattern, algo)

    @property
    def convention(self) -> str:
        """'compressed-tensors' or 'modelopt': the tensor names the checkpoint must use."""
        return "compressed-tensors" if self.method == "compressed-tensors" else "modelopt"


@dataclass(frozen=True)
class Config:
    text: TextConfig
    vision: VisionConfig | None = None
    quant: QuantConfig | None = None
    multimodal: bool = True  # VL wrapper: weights under model.language_model.*, else model.*
    special_tokens: dict[str, int] = field(default_factory=dict)  # image_token_id, ... (VL wrapper)
    preprocessor: PreprocessorConfig | None = None  # None when the checkpoint has no preprocessor_config.json

    @property
    def text_prefix(self) -> str:
        return "model.language_model." if self.multimodal else "model."


# ------------------------------------------------------------------------------------------------
# Parsing

_VL_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


class _Fields:
    """Typed access to one JSON object, with errors naming the source file and field path."""

    def __init__(self, raw: Any, source: str, path: str = ""):
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: {path or 'top level'} must be a JSON object, got {type(raw).__name__}")
        self.raw, self.source, self.path = raw, source, path

    def where(self, name: str) -> str:
        return f"{self.source}: field '{self.path}{name}'"

    def get(self, name: str, kind: type | tuple, default: Any = ..., positive: bool = False) -> Any:
        if name not in self.raw or (self.raw[name] is None and default is not ...):
            if default is ...:
                raise ConfigError(f"{self.where(name)} is missing")
            return default
        value = self.raw[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise ConfigError(f"{self.where(name)} must be {'/'.join(k.__name__ for k in kinds)}, got {value!r}")
        if positive and not value > 0:
            raise ConfigError(f"{self.where(name)} must be positive, got {value!r}")
        return value

    def int_list(self, name: str, default: Any = ...) -> tuple[int, ...]:
        value = self.get(name, (list, int), default)
        value = [value] if isinstance(value, int) else value
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{self.where(name)} must be a list of integers, got {value!r}")
        return tuple(value)

    def sub(self, name: str) -> "_Fields":
        return _Fields(self.raw[name], self.source, f"{self.path}{name}.")


def _layer_types(f: _Fields, num_layers: int) -> tuple[str, ...]:
    if "layer_types" in f.raw and f.raw["layer_types"] is not None:
        types = f.get("layer_types", list)
        if len(types) != num_layers:
            raise ConfigError(f"{f.where('layer_types')} has {len(types)} entries but num_hidden_layers is {num_layers}")
        bad = sorted({t for t in types if t not in (LINEAR, FULL)}, key=str)
        if bad:
            raise ConfigError(f"{f.where('layer_types')} has unknown layer types {bad}; expected {LINEAR!r} or {FULL!r}")
        return tuple(types)
    interval = f.get("full_attention_interval", int, positive=True)
    return tuple(FULL if (i + 1) % interval == 0 else LINEAR for i in range(num_layers))


def _rope(f: _Fields) -> dict:
    """RoPE from `rope_parameters` (newer) or top-level / `rope_scaling` fields (older)."""
    rp = f.sub("rope_parameters") if isinstance(f.raw.get("rope_parameters"), dict) else None
    rs = f.sub("rope_scaling") if isinstance(f.raw.get("rope_scaling"), dict) else None
    src = rp or f

    def pick(name, kind, default):
        for cand in (rp, f, rs):
            if cand is not None and cand.raw.get(name) is not None:
                return cand.get(name, kind)
        return default

    rope_type = pick("rope_type", str, "default")
    if rope_type != "default":
        raise ConfigError(f"{src.where('rope_type')} is {rope_type!r}; only 'default' RoPE is implemented")
    return dict(
        rope_theta=pick("rope_theta", float, 10_000_000.0),
        partial_rotary_factor=pick("partial_rotary_factor", float, 0.25),
        mrope_section=tuple(pick("mrope_section", list, [11, 11, 10])),
        mrope_interleaved=pick("mrope_interleaved", bool, True),
    )


def _text_config(f: _Fields) -> TextConfig:
    n_layers = f.get("num_hidden_layers", int, positive=True)
    eos = f.int_list("eos_token_id", ())
    cfg = TextConfig(
        hidden_size=f.get("hidden_size", int, positive=True),
        num_hidden_layers=n_layers,
        layer_types=_layer_types(f, n_layers),
        num_attention_heads=f.get("num_attention_heads", int, positive=True),
        num_key_value_heads=f.get("num_key_value_heads", int, positive=True),
        head_dim=f.get("head_dim", int, positive=True),
        linear_num_key_heads=f.get("linear_num_key_heads", int, positive=True),
        linear_num_value_heads=f.get("linear_num_value_heads", int, positive=True),
        linear_key_head_dim=f.get("linear_key_head_dim", int, positive=True),
        linear_value_head_dim=f.get("linear_value_head_dim", int, positive=True),
        linear_conv_kernel_dim=f.get("linear_conv_kernel_dim", int, positive=True),
        num_experts=f.get("num_experts", int, positive=True),
        num_experts_per_tok=f.get("num_experts_per_tok", int, positive=True),
        moe_intermediate_size=f.get("moe_intermediate_size", int, positive=True),
        shared_expert_intermediate_size=f.get("shared_expert_intermediate_size", int, positive=True),
        vocab_size=f.get("vocab_size", int, positive=True),
        rms_norm_eps=f.get("rms_norm_eps", float, 1e-6, positive=True),
        max_position_embeddings=f.get("max_position_embeddings", int, 262144, positive=True),
        mtp_num_hidden_layers=f.get("mtp_num_hidden_layers", int, 0),
        tie_word_embeddings=f.get("tie_word_embeddings", bool, False),
        eos_token_ids=eos,
        bos_token_id=f.get("bos_token_id", int, None),
        pad_token_id=f.get("pad_token_id", int, None),
        **_rope(f),
    )
    _check_text(cfg, f)
    return cfg


def _check_text(c: TextConfig, f: _Fields) -> None:
    def need(ok: bool, name: str, why: str):
        if not ok:
            raise ConfigError(f"{f.where(name)}: {why}")

    need(c.num_attention_heads % c.num_key_value_heads == 0, "num_key_value_heads",
         f"{c.num_key_value_heads} does not divide num_attention_heads {c.num_attention_heads}")
    need(c.linear_num_value_heads % c.linear_num_key_heads == 0, "linear_num_key_heads",
         f"{c.linear_num_key_heads} does not divide linear_num_value_heads {c.linear_num_value_heads}")
    need(c.num_experts_per_tok <= c.num_experts, "num_experts_per_tok",
         f"{c.num_experts_per_tok} exceeds num_experts {c.num_experts}")
    need(0 < c.partial_rotary_factor <= 1 and c.rotary_dim % 2 == 0, "partial_rotary_factor",
         f"{c.partial_rotary_factor} x head_dim {c.head_dim} must give an even rotary dimension")
    need(sum(c.mrope_section) == c.rotary_dim // 2, "mrope_section",
         f"{list(c.mrope_section)} sums to {sum(c.mrope_section)}, expected rotary_dim/2 = {c.rotary_dim // 2}")
    need(c.tie_word_embeddings is False, "tie_word_embeddings", "tied embeddings are not part of this model")
    need(c.mtp_num_hidden_layers in (0, 1), "mtp_num_hidden_layers", f"{c.mtp_num_hidden_layers} (0 or 1 supported)")


def _vision_config(f: _Fields) -> VisionConfig:
    return VisionConfig(
        depth=f.get("depth", int, positive=True),
        hidden_size=f.get("hidden_size", int, positive=True),
        num_heads=f.get("num_heads", int, positive=True),
        intermediate_size=f.get("intermediate_size", int, positive=True),
        out_hidden_size=f.get("out_hidden_size", int, positive=True),
        hidden_act=f.get("hidden_act", str, "gelu_pytorch_tanh"),
        in_channels=f.get("in_channels", int, 3),
        patch_size=f.get("patch_size", int, 16),
        temporal_patch_size=f.get("temporal_patch_size", int, 2),
        spatial_merge_size=f.get("spatial_merge_size", int, 2),
        num_position_embeddings=f.get("num_position_embeddings", int, 2304),
        deepstack_visual_indexes=f.int_list("deepstack_visual_indexes", ()),
        rope_theta=_vision_rope_theta(f),
    )


def _vision_rope_theta(f: _Fields) -> float:
    """The vision RoPE base from `rope_parameters` (transformers 5) or `rope_theta`; 10000 when absent.
    The vision rotary embedding is 2-D axial ('axial' in `rope_parameters.rope_type`)."""
    if isinstance(f.raw.get("rope_parameters"), dict):
        rp = f.sub("rope_parameters")
        rope_type = rp.get("rope_type", str, "axial")
        if rope_type != "axial":
            raise ConfigError(f"{rp.where('rope_type')} is {rope_type!r}; the vision encoder's RoPE is 'axial'")
        if rp.raw.get("rope_theta") is not None:
            return rp.get("rope_theta", float, positive=True)
    return f.get("rope_theta", float, 10_000.0, positive=True)


def parse_preprocessor_config(raw: dict, source: str = "preprocessor_config.json") -> PreprocessorConfig:
    """The image processor's settings from a parsed preprocessor_config.json (not checked against a
    vision_config: parse_config does that)."""
    return _preprocessor_config(_Fields(raw, source))


def _preprocessor_config(f: _Fields) -> PreprocessorConfig:
    """transformers' Qwen2-VL image processor settings; its class defaults fill missing fields."""
    d = PreprocessorConfig()
    for flag in ("do_resize", "do_convert_rgb"):
        if f.get(flag, bool, True) is not True:
            raise ConfigError(f"{f.where(flag)} is false; only resized RGB images are supported")
    size = f.sub("size") if "size" in f.raw and f.raw["size"] is not None else None
    min_pixels = f.get("min_pixels", int, None, positive=True)
    max_pixels = f.get("max_pixels", int, None, positive=True)
    if min_pixels is None:
        min_pixels = size.get("shortest_edge", int, positive=True) if size is not None else d.min_pixels
    if max_pixels is None:
        max_pixels = size.get("longest_edge", int, positive=True) if size is not None else d.max_pixels
    cfg = PreprocessorConfig(
        patch_size=f.get("patch_size", int, d.patch_size, positive=True),
        temporal_patch_size=f.get("temporal_patch_size", int, d.temporal_patch_size, positive=True),
        merge_size=f.get("merge_size", int, d.merge_size, positive=True),
        image_mean=_per_channel(f, "image_mean", d.image_mean),
        image_std=_per_channel(f, "image_std", d.image_std),
        min_pixels=min_pixels, max_pixels=max_pixels,
        rescale_factor=f.get("rescale_factor", float, d.rescale_factor, positive=True),
        resample=f.get("resample", int, d.resample),
        do_rescale=f.get("do_rescale", bool, d.do_rescale),
        do_normalize=f.get("do_normalize", bool, d.do_normalize),
    )
    if cfg.min_pixels > cfg.max_pixels:
        raise ConfigError(f"{f.where('size')}: shortest_edge (min pixels) {cfg.min_pixels} exceeds "
                          f"longest_edge (max pixels) {cfg.max_pixels}")
    if cfg.resample not in range(6):
        raise ConfigError(f"{f.where('resample')} is {cfg.resample}; expected a Pillow filter number 0..5")
    if 0 in cfg.image_std:
        raise ConfigError(f"{f.where('image_std')} has a zero: {list(cfg.image_std)}")
    return cfg


def _per_channel(f: _Fields, name: str, default: tuple[float, ...]) -> tuple[float, ...]:
    """A per-channel list of numbers, or one number for every channel (as transformers accepts)."""
    value = f.get(name, (list, float), list(default))
    values = value if isinstance(value, list) else [value] * 3
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{f.where(name)} must be a number or a list of numbers, got {value!r}")
    return tuple(float(v) for v in values)


def _check_preprocessor(pp: PreprocessorConfig, v: VisionConfig, source: str, vision_source: str) -> None:
    """The image processor must cut the patches the vision tower was built for."""
    for name, mine, theirs, field_ in (("patch_size", pp.patch_size, v.patch_size, "patch_size"),
                                       ("temporal_patch_size", pp.temporal_patch_size, v.temporal_patch_size,
                                        "temporal_patch_size"),
                                       ("merge_size", pp.merge_size, v.spatial_merge_size, "spatial_merge_size")):
        if mine != theirs:
            raise ConfigError(f"{source}: field '{name}' is {mine} but {vision_source} says "
                              f"vision_config.{field_} = {theirs}")
    for name in ("image_mean", "image_std"):
        n = len(getattr(pp, name))
        if n != v.in_channels:
            raise ConfigError(f"{source}: field '{name}' has {n} values but {vision_source} says "
                              f"vision_config.in_channels = {v.in_channels}")


def _kv_algo(kv) -> str | None:
    """kv_cache_scheme (a string, or {num_bits, type}) -> 'FP8' / 'NVFP4' / the string / None."""
    if isinstance(kv, str):
        return kv
    if isinstance(kv, dict) and kv.get("type", "float") == "float":
        return {8: "FP8", 4: "NVFP4"}.get(kv.get("num_bits"))
    return None


def _producer(raw: dict) -> str:
    producer = raw.get("producer") or {}
    return f"{producer.get('name', '')} {producer.get('version', '')}".strip()


def _quantized_layers(f: _Fields) -> tuple[tuple[str, str], ...]:
    """MIXED_PRECISION `quantized_layers` {module: {quant_algo, group_size}} -> sorted (module, algo)."""
    layers = f.get("quantized_layers", dict, {})
    if not layers:
        raise ConfigError(f"{f.where('quantized_layers')} is missing or empty; MIXED_PRECISION lists every "
                          f"quantized module there")
    sub = f.sub("quantized_layers")
    out = []
    for name in sorted(layers):
        entry = sub.sub(name) if isinstance(layers[name], dict) else None
        if entry is None:
            raise ConfigError(f"{sub.where(name)} must be a JSON object, got {layers[name]!r}")
        algo = entry.get("quant_algo", str)
        if algo not in MIXED_ALGOS:
            raise ConfigError(f"{entry.where('quant_algo')} is {algo!r}; this reader supports {list(MIXED_ALGOS)} "
                              f"in a MIXED_PRECISION checkpoint")
        if algo == "NVFP4" and entry.get("group_size", int, 16) != 16:
            raise ConfigError(f"{entry.where('group_size')} is {entry.raw['group_size']}; NVFP4 uses 16")
        out.append((name, algo))
    return tuple(out)


def _quant_from_compressed_tensors(f: _Fields) -> QuantConfig:
    """An llm-compressor config: every group must be NVFP4 (4-bit float weights, group 16)."""
    groups = f.get("config_groups", dict)
    for name in sorted(groups):
        g = f.sub("config_groups").sub(name)
        w = g.sub("weights")
        spec = (w.get("num_bits", int), w.get("type", str), w.get("group_size", int, None))
        if spec != (4, "float", 16):
            raise ConfigError(f"{w.where('num_bits')}: (num_bits, type, group_size) is {spec}; only NVFP4 "
                              f"(4, 'float', 16) compressed-tensors checkpoints are supported")
    fmt = f.get("format", str, CT_FORMAT)
    if fmt != CT_FORMAT:
        raise ConfigError(f"{f.where('format')} is {fmt!r}; expected {CT_FORMAT!r}")
    version = f.get("version", str, "")
    return QuantConfig("NVFP4", 16, tuple(f.get("ignore", list, [])), _kv_algo(f.raw.get("kv_cache_scheme")),
                       f"compressed-tensors {version}".strip(), "compressed-tensors")


def _quant_from_config_json(f: _Fields) -> QuantConfig:
    method = f.get("quant_method", str, "modelopt")
    if method not in QUANT_METHODS:
        raise ConfigError(f"{f.where('quant_method')} is {method!r}; only 'modelopt', 'modelopt_mixed' or "
                          f"'compressed-tensors' checkpoints are supported")
    if method == "compressed-tensors":
        return _quant_from_compressed_tensors(f)
    algo = f.get("quant_algo", str)
    group = 16
    groups = f.raw.get("config_groups") or {}
    for g in groups.values():
        if isinstance(g, dict) and isinstance(g.get("weights"), dict) and algo == "NVFP4":
            group = g["weights"].get("group_size", group)
    if method == "modelopt_mixed" and algo != "MIXED_PRECISION":
        raise ConfigError(f"{f.where('quant_algo')} is {algo!r} but quant_method is 'modelopt_mixed'")
    layers = _quantized_layers(f) if algo == "MIXED_PRECISION" else ()
    return QuantConfig(algo, group, tuple(f.get("ignore", list, [])), _kv_algo(f.raw.get("kv_cache_scheme")),
                       _producer(f.raw), method, layers)


def _quant_from_hf_quant(f: _Fields) -> QuantConfig:
    q = f.sub("quantization") if "quantization" in f.raw else None
    if q is None:
        raise ConfigError(f"{f.where('quantization')} is missing")
    algo = q.get("quant_algo", str)
    layers = _quantized_layers(q) if algo == "MIXED_PRECISION" else ()
    return QuantConfig(algo, q.get("group_size", int, 16), tuple(q.get("exclude_modules", list, [])),
                       q.get("kv_cache_quant_algo", str, None), _producer(f.raw), "modelopt", layers)


def _check_quant(q: QuantConfig, where: str) -> QuantConfig:
    if q.quant_algo not in KNOWN_QUANT_ALGOS:
        raise ConfigError(f"{where}: field 'quant_algo' is {q.quant_algo!r}; expected one of {list(KNOWN_QUANT_ALGOS)}")
    if q.quant_algo == "NVFP4" and q.group_size != 16:
        raise ConfigError(f"{where}: field 'group_size' is {q.group_size}; NVFP4 uses 16")
    return q


def parse_config(raw: dict, quant_raw: dict | None = None, source: str = "config.json",
                 quant_source: str = "hf_quant_config.json", preprocessor_raw: dict | None = None,
                 preprocessor_source: str = "preprocessor_config.json") -> Config:
    """Build a Config from the parsed config.json (and hf_quant_config.json and
    preprocessor_config.json, if there are any)."""
    top = _Fields(raw, source)
    multimodal = "text_config" in raw
    text_fields = top.sub("text_config") if multimodal else top
    text = _text_config(text_fields)
    vision = _vision_config(top.sub("vision_config")) if isinstance(raw.get("vision_config"), dict) else None
    quant = None
    if isinstance(raw.get("quantization_config"), dict):
        quant = _check_quant(_quant_from_config_json(top.sub("quantization_config")), source)
    if quant_raw is not None:
        from_file = _check_quant(_quant_from_hf_quant(_Fields(quant_raw, quant_source)), quant_source)
        if quant is not None and quant.method == "compressed-tensors":
            raise ConfigError(f"{quant_source}: a ModelOpt file next to a compressed-tensors {source} "
                              f"(quant_method 'compressed-tensors'): the checkpoint mixes conventions")
        if quant is not None and quant.quant_algo != from_file.quant_algo:
            raise ConfigError(f"{quant_source}: field 'quantization.quant_algo' is {from_file.quant_algo!r} but "
                              f"{source} says {quant.quant_algo!r}")
        if quant is not None and quant.quantized_layers and quant.quantized_layers != from_file.quantized_layers:
            raise ConfigError(f"{quant_source}: field 'quantization.quantized_layers' differs from {source}'s "
                              f"quantization_config.quantized_layers")
        quant = replace(from_file, method=quant.method) if quant is not None else from_file
    specials = {k: top.get(k, int) for k in _VL_TOKEN_FIELDS if isinstance(raw.get(k), int)}
    preprocessor = None
    if preprocessor_raw is not None:
        preprocessor = _preprocessor_config(_Fields(preprocessor_raw, preprocessor_source))
        if vision is not None:
            _check_preprocessor(preprocessor, vision, preprocessor_source, source)
    return Config(text=text, vision=vision, quant=quant, multimodal=multimodal, special_tokens=specials,
                  preprocessor=preprocessor)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def load_config(directory: str | Path) -> Config:
    """Read config.json and, if present, hf_quant_config.json and the image processor's settings
    (preprocessor_config.json, else the `image_processor` object of processor_config.json)."""
    directory = Path(directory)
    quant_path = directory / "hf_quant_config.json"
    quant_raw = _read_json(quant_path) if quant_path.exists() else None
    pre_raw, pre_source = _read_preprocessor(directory)
    return parse_config(_read_json(directory / "config.json"), quant_raw,
                        str(directory / "config.json"), str(quant_path), pre_raw, pre_source)


def _read_preprocessor(directory: Path) -> tuple[dict | None, str]:
    path = directory / "preprocessor_config.json"
    if path.exists():
        return _read_json(path), str(path)
    combined = directory / "processor_config.json"
    if combined.exists():
        raw = _read_json(combined)
        if isinstance(raw, dict) and "image_processor" in raw:
            return raw["image_processor"], f"{combined} (image_processor)"
    return None, str(path)


# ------------------------------------------------------------------------------------------------
# Writing (used by ref.synth, so that what we write is exactly what we read)

def text_config_dict(t: TextConfig) -> dict:
    d = asdict(t)
    rope = {"rope_type": "default", "rope_theta": d.pop("rope_theta"),
            "partial_rotary_factor": d.pop("partial_rotary_factor"),
            "mrope_section": list(d.pop("mrope_section")), "mrope_interleaved": d.pop("mrope_interleaved")}
    eos = d.pop("eos_token_ids")
    d.update(model_type="qwen3_5_moe_text", layer_types=list(t.layer_types), rope_parameters=rope,
             eos_token_id=eos[0] if len(eos) == 1 else list(eos), full_attention_interval=_interval(t),
             attn_output_gate=True, hidden_act="silu", norm_topk_prob=True, mamba_ssm_dtype="float32",
             mtp_use_dedicated_embeddings=False, dtype="bfloat16")
    return d


def _interval(t: TextConfig) -> int:
    full = t.full_attention_layers
    return full[0] + 1 if full else t.num_hidden_layers + 1


def config_dict(cfg: Config) -> dict:
    """The config.json this Config was (or would be) read from, VL wrapper form when multimodal."""
    text = text_config_dict(cfg.text)
    if not cfg.multimodal:
        out = dict(text, architectures=["Qwen3_5MoeForCausalLM"])
    else:
        out = {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
               "tie_word_embeddings": False, **cfg.special_tokens, "text_config": text}
        if cfg.vision is not None:
            vision = asdict(cfg.vision)
            vision["deepstack_visual_indexes"] = list(cfg.vision.deepstack_visual_indexes)
            vision["rope_parameters"] = {"rope_type": "axial", "rope_theta": vision.pop("rope_theta")}
            out["vision_config"] = dict(vision, model_type="qwen3_5_moe")
    if cfg.quant is not None:
        out["quantization_config"] = quantization_config_dict(cfg.quant)
    return out


def preprocessor_config_dict(pp: PreprocessorConfig) -> dict:
    """preprocessor_config.json in the form Qwen3.5 checkpoints ship it (fields at their defaults
    omitted, as there)."""
    d = PreprocessorConfig()
    out = {"size": {"longest_edge": pp.max_pixels, "shortest_edge": pp.min_pixels},
           "patch_size": pp.patch_size, "temporal_patch_size": pp.temporal_patch_size, "merge_size": pp.merge_size,
           "image_mean": list(pp.image_mean), "image_std": list(pp.image_std)}
    out |= {k: getattr(pp, k) for k in ("rescale_factor", "resample", "do_rescale", "do_normalize")
            if getattr(pp, k) != getattr(d, k)}
    return out | {"processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast"}


def _kv_scheme(algo: str | None):
    bits = {"FP8": 8, "NVFP4": 4}.get(algo)
    return {"dynamic": False, "num_bits": bits, "type": "float"} if bits else algo


def _algo_group(algo: str) -> dict:
    """A compressed-tensors style group for one ModelOpt algorithm (convert_hf_config.py)."""
    if algo == "FP8":
        block = {"dynamic": False, "num_bits": 8, "type": "float"}
    else:
        block = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    return {"input_activations": block, "weights": block}


def quantization_config_dict(q: QuantConfig) -> dict:
    """config.json's quantization_config for q, in the form its producer writes."""
    name, _, version = q.producer.partition(" ")
    if q.method == "compressed-tensors":
        act = {"dynamic": "local", "group_size": 16, "num_bits": 4, "observer": "minmax", "strategy": "tensor_group",
               "symmetric": True, "type": "float"}
        weights = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": 16, "num_bits": 4,
                   "observer": "minmax", "strategy": "tensor_group", "symmetric": True, "type": "float"}
        group = {"format": CT_FORMAT, "input_activations": act, "output_activations": None, "targets": ["Linear"],
                 "weights": weights}
        return {"config_groups": {"group_0": group}, "format": CT_FORMAT, "global_compression_ratio": None,
                "ignore": list(q.exclude_modules), "kv_cache_scheme": _kv_scheme(q.kv_cache_quant_algo),
                "quant_method": "compressed-tensors", "quantization_status": "compressed", "version": version}
    if q.quant_algo == "MIXED_PRECISION":
        algos = list(dict.fromkeys(algo for _, algo in q.quantized_layers))
        groups = {f"group_{i}": dict(_algo_group(a), targets=sorted(n for n, b in q.quantized_layers if b == a))
                  for i, a in enumerate(algos)}
        out = {"config_groups": groups, "quantized_layers": _layers_dict(q), "ignore": list(q.exclude_modules),
               "quant_algo": q.quant_algo}
    else:
        block = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": q.group_size}
        out = {"config_groups": {"group_0": {"input_activations": block, "weights": block, "targets": ["Linear"]}},
               "ignore": list(q.exclude_modules), "quant_algo": q.quant_algo}
    if q.kv_cache_quant_algo:
        out["kv_cache_scheme"] = _kv_scheme(q.kv_cache_quant_algo)
    return out | {"producer": {"name": name, "version": version}, "quant_method": q.method}


def _layers_dict(q: QuantConfig) -> dict:
    return {n: {"quant_algo": a, "group_size": 16} if a == "NVFP4" else {"quant_algo": a}
            for n, a in q.quantized_layers}


def hf_quant_config_dict(q: QuantConfig) -> dict:
    name, _, version = q.producer.partition(" ")
    body = {"quant_algo": q.quant_algo, "kv_cache_quant_algo": q.kv_cache_quant_algo,
            "group_size": q.group_size, "exclude_modules": list(q.exclude_modules)}
    if q.quantized_layers:
        body["quantized_layers"] = _layers_dict(q)
    return {"producer": {"name": name, "version": version}, "quantization": body}


# ------------------------------------------------------------------------------------------------
# The published model

QWEN35_397B_TEXT = TextConfig(
    hidden_size=4096, num_hidden_layers=60,
    layer_types=tuple(FULL if (i + 1) % 4 == 0 else LINEAR for i in range(60)),
    num_attention_heads=32, num_key_value_heads=2, head_dim=256,
    linear_num_key_heads=16, linear_num_value_heads=64, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_conv_kernel_dim=4, num_experts=512, num_experts_per_tok=10, moe_intermediate_size=1024,
    shared_expert_intermediate_size=1024, vocab_size=248320, rms_norm_eps=1e-6,
    max_position_embeddings=262144, rope_theta=10_000_000.0, partial_rotary_factor=0.25,
    mrope_section=(11, 11, 10), mrope_interleaved=True, mtp_num_hidden_layers=1,
    eos_token_ids=(248046,),
)

QWEN35_397B_VISION = VisionConfig(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304,
                                  out_hidden_size=4096)

# Modules left in BF16 by the seed checkpoint (ModelOpt 0.37, routed experts only quantized).
SEED_EXCLUDE_MODULES = ("lm_head", "model.language_model.layers.*.linear_attn*",
                        "model.language_model.layers.*.mlp.gate", "model.language_model.layers.*.mlp.shared_expert*",
                        "model.language_model.layers.*.self_attn*", "model.visual*", "mtp*")

# Qwen3.5's preprocessor_config.json: 16-pixel patches, merged 2x2, 256x256 to 4096x4096 pixels.
QWEN35_PREPROCESSOR = PreprocessorConfig(patch_size=16, temporal_patch_size=2, merge_size=2,
                                         image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                                         min_pixels=65536, max_pixels=16777216)

QWEN35_397B = Config(
    text=QWEN35_397B_TEXT, vision=QWEN35_397B_VISION,
    quant=QuantConfig("NVFP4", 16, SEED_EXCLUDE_MODULES, None, "modelopt 0.37.0"),
    multimodal=True,
    special_tokens={"image_token_id": 248056, "video_token_id": 248057,
                    "vision_start_token_id": 248053, "vision_end_token_id": 248054},
    preprocessor=QWEN35_PREPROCESSOR,
)

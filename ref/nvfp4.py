"""NVFP4: E2M1 elements, FP8 E4M3 block scales, float32 global scales — bit-exact, in NumPy.

This module is the only place the format's constants live. Normative text: spec/nvfp4.md.

Layout of one quantized linear [N, K] (ModelOpt export, checkpoint order):
  packed        uint8 [..., K/2]           element 2j in the low nibble, 2j+1 in the high nibble
  weight_scale  float8_e4m3fn [..., K/16]  one scale per 16 consecutive elements of a row
  weight_scale_2 float32 0-d               global ("per-tensor") scale, dequant direction
  value = e2m1(code) * fp32(fp32(weight_scale) * weight_scale_2)
"""
import functools

import numpy as np
import ml_dtypes

from ref.errors import FormatError

__all__ = ["encode_e2m1", "decode_e2m1", "pack_e2m1", "unpack_e2m1", "encode_e4m3", "decode_e4m3",
           "round_to_bf16", "quantize_weight", "quantize_weight_ct", "invert_global_scale", "dequantize",
           "row_decoder", "quantize_activation", "nvfp4_matmul", "round_scaled",
           "swizzle_scales", "unswizzle_scales", "FormatError", "BLOCK_SIZE", "E2M1_MAX", "E4M3_MAX",
           "E4M3_MIN_SUBNORMAL", "GLOBAL_DIVISOR", "NAN_CODE", "SIGN_RULES", "RECIPES",
           "SWIZZLE_ROWS", "SWIZZLE_COLS", "TIES_DOWN", "TIES_UP", "E2M1_VALUES", "E4M3"]

BLOCK_SIZE = 16                      # elements per block scale
E2M1_MAX = 6.0                       # largest E2M1 magnitude
E4M3_MAX = 448.0                     # largest finite float8_e4m3fn
E4M3_MIN_SUBNORMAL = 2.0 ** -9       # smallest positive float8_e4m3fn
GLOBAL_DIVISOR = E2M1_MAX * E4M3_MAX  # 2688: weight_scale_2 = amax / 2688
NAN_CODE = 0x7                       # NaN encodes as +6 under both sign rules
SIGN_RULES = ("modelopt", "cuda")
RECIPES = ("modelopt-0.37", "modelopt-0.45")
SWIZZLE_ROWS = 128                   # CUTLASS SM100 scale-factor atom: 128 rows x 4 scale columns
SWIZZLE_COLS = 4
# E2M1 rounding thresholds (midpoints between neighbouring magnitudes); a tie goes to the even code
TIES_DOWN = (0.25, 1.25, 2.5, 5.0)   # |x| == t -> the lower magnitude (0, 1, 2, 4)
TIES_UP = (0.75, 1.75, 3.5)          # |x| == t -> the upper magnitude (1, 2, 4)

# code -> value, bit 3 = sign, bits 2..1 = exponent (bias 1), bit 0 = mantissa
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)

E4M3 = ml_dtypes.float8_e4m3fn
_CHUNK = 1 << 17                     # elements per step of the vectorised loops (fits in L2)
_SMALL_BLOCKS = 4096                 # dequantize: below this many blocks skip the 64K-entry table
_FLOAT_INPUTS = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16),
                 np.dtype(np.float32), np.dtype(np.float64))

# byte -> (value of low nibble, value of high nibble): one table read decodes two elements.
_PAIRS = np.stack([E2M1_VALUES[np.arange(256) & 15], E2M1_VALUES[np.arange(256) >> 4]], axis=-1)
_E4M3_BYTES = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32)      # [256] byte -> value
_PAIR_ITEM = {np.dtype(np.float32): np.dtype(np.uint64), np.dtype(np.float64): np.dtype(np.complex128)}


# ---------------------------------------------------------------------------------------------
# input checks and exact narrowing


def _float_array(x, name):
    """x as an ndarray of one of the accepted float dtypes, else FormatError."""
    a = np.asarray(x)
    if a.dtype not in _FLOAT_INPUTS:
        raise FormatError(f"{name}: expected float16/bfloat16/float32/float64, got dtype {a.dtype}")
    return a


def _to_float32_odd(a):
    """Float array -> float32 such that one later rounding to a format of <= 22 bits is exact.

    float16/bfloat16/float32 convert exactly. float64 rounds to odd (truncate, then set the last
    bit if inexact), so ml_dtypes' float32-based casts round float64 input correctly once.
    """
    if a.dtype != np.float64:
        return a.astype(np.float32, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):
        r = a.astype(np.float32)
        r64 = r.astype(np.float64)
        inexact = (r64 != a) & np.isfinite(a)
        away = inexact & (np.abs(r64) > np.abs(a))
    r = np.where(away, np.nextafter(r, np.float32(0)), r).astype(np.float32)
    return (r.view(np.uint32) | inexact.astype(np.uint32)).view(np.float32).reshape(a.shape)


def _scalar_f32(x, name, positive=False):
    """A 0-d float input as a float32 0-d array (positive finite when asked)."""
    a = np.asarray(x)
    if a.ndim != 0:
        raise FormatError(f"{name}: expected a 0-d scalar, got shape {a.shape}")
    if a.dtype.kind != "f" and a.dtype != np.dtype(ml_dtypes.bfloat16):
        raise FormatError(f"{name}: expected a float scalar, got dtype {a.dtype}")
    v = np.asarray(a.astype(np.float32))
    if positive and not (np.isfinite(v) and v > 0):
        raise FormatError(f"{name}: expected a positive finite float32, got {float(v)!r}")
    return v


def _check_blocked(a, name):
    if a.ndim < 1 or a.shape[-1] % BLOCK_SIZE or a.shape[-1] == 0:
        raise FormatError(f"{name}: expected a last dimension that is a positive multiple of "
                          f"{BLOCK_SIZE}, got shape {a.shape}")


# ---------------------------------------------------------------------------------------------
# E2M1 elements


def encode_e2m1(x, sign="modelopt"):
    """Float array -> uint8 E2M1 codes 0..15, same shape.

    Round to nearest, ties to even; |x| > 5 and +-inf saturate to +-6; NaN -> code 7.
    sign="modelopt": sign bit set iff x < 0 (so -0.0 -> 0x0); sign="cuda": sign bit copied
    (so -0.0 -> 0x8). Negative values that round to zero get 0x8 under both rules.
    """
    if sign not in SIGN_RULES:
        raise FormatError(f"sign: expected one of {SIGN_RULES}, got {sign!r}")
    a = _float_array(x, "x")
    y = _to_float32_odd(a).reshape(-1)                        # [n] float32
    codes = np.empty(y.shape, np.uint8)
    for i in range(0, y.size, _CHUNK):
        codes[i:i + _CHUNK] = _encode_f32(y[i:i + _CHUNK], sign)
    return codes.reshape(a.shape)


def _encode_f32(y, sign):
    """encode_e2m1 of a 1-D float32 array (no checks)."""
    mag = np.abs(y)
    below = np.zeros(y.shape, np.uint8)                       # thresholds at or above |y|
    for t in TIES_DOWN:
        below += mag <= t
    for t in TIES_UP:
        below += mag < t
    codes = np.uint8(NAN_CODE) - below                        # NaN fails every test -> 7
    if sign == "modelopt":
        neg = y < 0
    else:
        neg = (y.view(np.int32) < 0) & (mag <= np.inf)        # sign bit, except on NaN
    codes |= neg.view(np.uint8) << np.uint8(3)
    return codes


def _check_codes(c, name, limit):
    c = np.asarray(c)
    if c.dtype.kind not in "ui":
        raise FormatError(f"{name}: expected an integer (uint8) array, got dtype {c.dtype}")
    if c.size and (c.min() < 0 or c.max() > limit):
        raise FormatError(f"{name}: expected values in 0..{limit}, got {c.min()}..{c.max()}")
    return c.astype(np.uint8, copy=False)


def decode_e2m1(codes):
    """uint8 codes 0..15 -> float32 values (0x8 is -0.0)."""
    c = _check_codes(codes, "codes", 15)
    return E2M1_VALUES[c]


def pack_e2m1(codes):
    """Codes [..., 2n] -> bytes [..., n]: element 2j in the low nibble, 2j+1 in the high nibble."""
    c = _check_codes(codes, "codes", 15)
    if c.ndim < 1 or c.shape[-1] % 2:
        raise FormatError(f"codes: expected an even last dimension, got shape {c.shape}")
    return _pack(np.ascontiguousarray(c))


def _pack(c):
    """pack_e2m1 of a contiguous uint8 code array (no checks)."""
    pairs = c.view("<u2")                                     # [..., n]: c[2j] | c[2j+1] << 8
    return (pairs | (pairs >> np.uint16(4))).astype(np.uint8)


def unpack_e2m1(packed):
    """Bytes [..., n] -> codes [..., 2n] (inverse of pack_e2m1)."""
    p = np.asarray(packed)
    if p.dtype != np.uint8 or p.ndim < 1:
        raise FormatError(f"packed: expected a uint8 array of rank >= 1, "
                          f"got dtype {p.dtype} shape {p.shape}")
    out = np.empty(p.shape[:-1] + (2 * p.shape[-1],), dtype=np.uint8)
    out[..., 0::2] = p & np.uint8(15)
    out[..., 1::2] = p >> np.uint8(4)
    return out


# ---------------------------------------------------------------------------------------------
# FP8 E4M3 scales and bfloat16


def encode_e4m3(x):
    """Float array -> float8_e4m3fn, round to nearest even, saturating at +-448 (NaN stays NaN)."""
    a = _float_array(x, "x")
    y = np.clip(_to_float32_odd(a), -E4M3_MAX, E4M3_MAX)
    return np.asarray(y.astype(E4M3)).reshape(a.shape)


def decode_e4m3(s):
    """float8_e4m3fn array (or its raw uint8 bytes) -> exact float32 values."""
    a = np.asarray(s)
    if a.dtype == np.uint8:
        a = a.view(E4M3)
    elif a.dtype != np.dtype(E4M3):
        raise FormatError(f"scales: expected float8_e4m3fn or uint8, got dtype {a.dtype}")
    return a.astype(np.float32)


def round_to_bf16(x):
    """Round to the nearest bfloat16 value, ties to even; NaN and +-inf preserved.

    Returns float64 for float64 input (one correct rounding), float32 otherwise.
    """
    a = _float_array(x, "x")
    out_dtype = np.float64 if a.dtype == np.float64 else np.float32
    return np.asarray(_to_float32_odd(a).astype(ml_dtypes.bfloat16).astype(out_dtype)).reshape(a.shape)


# ---------------------------------------------------------------------------------------------
# weights (ModelOpt export) and dequantization


def _row_chunks(rows, k):
    """Row ranges of about _CHUNK elements each (the per-chunk temporaries stay in cache)."""
    step = max(1, _CHUNK // max(k, 1))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def _block_amax(y):
    """|y| maximum over each block of 16 of a float32 [rows, K] tile (NaN propagates)
    -> [rows, K/16]."""
    a = np.abs(y).reshape(-1, BLOCK_SIZE)                     # [blocks, 16]
    return a.T.copy().max(axis=0).reshape(y.shape[0], -1)    # transposed: 16 fast row maxima


def quantize_weight(w, recipe="modelopt-0.37", global_scale=None):
    """ModelOpt's NVFP4 weight export: w [..., K] -> (packed uint8 [..., K/2],
    weight_scale float8_e4m3fn [..., K/16], weight_scale_2 float32 0-d).

    Leading dimensions are rows of one tensor with one weight_scale_2 (quantize fused experts
    one expert at a time for per-expert globals). All arithmetic in float32 (float64 input is
    first rounded to float32):
      amax = global_scale if given (tie gate/up: max of both amaxes) else max|w|
      weight_scale_2 = fp32(amax / 2688)
      s = fp32(block_amax / fp32(6 * weight_scale_2)); s == 0 -> 1.0
      modelopt-0.37: weight_scale = e4m3(s)  (tiny blocks underflow to byte 0x00)
      modelopt-0.45: weight_scale = e4m3(clip(s, 2^-9, 448))
      codes = encode_e2m1(w / fp32(fp32(weight_scale) * weight_scale_2), sign="modelopt")
    global_scale below max|w| is not checked (ModelOpt does not): block scales then exceed 448,
    which modelopt-0.37 casts without saturation (NaN above 464) and modelopt-0.45 clamps.
    An all-zero tensor without global_scale gives weight_scale_2 = 0 and NaN scales, as ModelOpt.
    """
    if recipe not in RECIPES:
        raise FormatError(f"recipe: expected one of {RECIPES}, got {recipe!r}")
    a = _float_array(w, "w")
    _check_blocked(a, "w")
    k = a.shape[-1]
    w2 = a.reshape(-1, k)                                        # [R, K]
    chunks = _row_chunks(w2.shape[0], k)
    bmax = np.empty((w2.shape[0], k // BLOCK_SIZE), np.float32)  # [R, K/16]
    for r0, r1 in chunks:
        bmax[r0:r1] = _block_amax(w2[r0:r1].astype(np.float32))
    if global_scale is None:
        amax = np.float32(bmax.max()) if bmax.size else np.float32(0)
    else:
        amax = _scalar_f32(global_scale, "global_scale", positive=True)[()]
    with np.errstate(divide="ignore", invalid="ignore"):
        scale_2 = np.float32(amax / np.float32(GLOBAL_DIVISOR))
        s = bmax / np.float32(np.float32(E2M1_MAX) * scale_2)    # [..., K/16]
        s = np.where(s == 0, np.float32(1.0), s).astype(np.float32)
        if recipe == "modelopt-0.45":
            s = np.clip(s, np.float32(E4M3_MIN_SUBNORMAL), np.float32(E4M3_MAX))
        weight_scale = np.asarray(s.astype(E4M3))
        den = (weight_scale.astype(np.float32) * scale_2).astype(np.float32)   # [R, K/16]
        packed = np.empty((w2.shape[0], k // 2), np.uint8)                      # [R, K/2]
        for r0, r1 in chunks:
            y = w2[r0:r1].astype(np.float32).reshape(r1 - r0, -1, BLOCK_SIZE) / den[r0:r1, :, None]
            packed[r0:r1] = _pack(_encode_f32(y.reshape(-1), "modelopt").reshape(r1 - r0, k))
    return (packed.reshape(a.shape[:-1] + (k // 2,)),
            weight_scale.reshape(a.shape[:-1] + (k // BLOCK_SIZE,)),
            np.asarray(scale_2, dtype=np.float32))


def quantize_weight_ct(w, global_amax=None):
    """A compressed-tensors (llm-compressor) NVFP4 weight: w [..., K] -> (packed uint8 [..., K/2],
    weight_scale float8_e4m3fn [..., K/16], weight_global_scale float32 [1]).

    The global is stored in the quantization direction (a multiplier, 2688/amax), the inverse of
    ModelOpt's weight_scale_2. The recipe this project's synthetic checkpoints use, modelled on
    compressed-tensors' generate_gparam / calculate_qparams / _quantize; all float32:
      amax = global_amax if given (fused layers share one) else max|w|; amax must be positive
      g = fp32(2688 / amax)
      weight_scale = e4m3 saturating(fp32(g * fp32(block_amax / 6)))
      f = fp32(fp32(weight_scale) / g); codes = encode_e2m1(fp32(w / f), sign="modelopt")
    A block whose scale underflows to 0 gets f = 0 and codes 0x7 / NaN -> 0x7: it decodes to 0.
    """
    a = _float_array(w, "w")
    _check_blocked(a, "w")
    k = a.shape[-1]
    w2 = _to_float32_odd(a).reshape(-1, k).astype(np.float32)                  # [R, K]
    bmax = _block_amax(w2)                                                     # [R, K/16]
    amax = np.float32(bmax.max()) if global_amax is None else \
        _scalar_f32(global_amax, "global_amax", positive=True)[()]
    if not (np.isfinite(amax) and amax > 0):
        raise FormatError(f"w: expected a positive finite amax for the compressed-tensors global "
                          f"scale 2688/amax, got {float(amax)!r}")
    g = np.float32(np.float32(GLOBAL_DIVISOR) / amax)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        sf = (g * (bmax / np.float32(E2M1_MAX)).astype(np.float32)).astype(np.float32)
        weight_scale = np.asarray(np.minimum(sf, np.float32(E4M3_MAX)).astype(E4M3))
        f = (weight_scale.astype(np.float32) / g).astype(np.float32)           # [R, K/16]
        y = w2.reshape(w2.shape[0], -1, BLOCK_SIZE) / f[..., None]
    packed = _pack(_encode_f32(y.astype(np.float32).reshape(-1), "modelopt").reshape(w2.shape))
    return (packed.reshape(a.shape[:-1] + (k // 2,)),
            weight_scale.reshape(a.shape[:-1] + (k // BLOCK_SIZE,)),
            np.full((1,), g, np.float32))


def invert_global_scale(global_scale):
    """A quantization-direction global (compressed-tensors' weight_global_scale or
    input_global_scale, [] or [1]) -> the dequantization-direction float32 0-d scale
    fp32(1 / global_scale), correctly rounded, as vLLM converts it once at load time
    (CompressedTensorsW4A4Fp4 / CompressedTensorsW4A4Nvfp4MoEMethod.process_weights_after_loading)."""
    g = np.asarray(global_scale)
    if g.size != 1:
        raise FormatError(f"global_scale: expected one value ([] or [1]), got shape {g.shape}")
    v = _scalar_f32(g.reshape(()), "global_scale", positive=True)
    return np.asarray(np.float32(1) / v, dtype=np.float32)


def _check_triplet(packed, scales, name_scales="weight_scale"):
    """Validate packed bytes against block scales; return (packed, scale bytes uint8)."""
    p = np.asarray(packed)
    if p.dtype != np.uint8 or p.ndim < 1:
        raise FormatError(f"packed: expected a uint8 array of rank >= 1, "
                          f"got dtype {p.dtype} shape {p.shape}")
    if p.shape[-1] % (BLOCK_SIZE // 2) or p.shape[-1] == 0:
        raise FormatError(f"packed: expected a last dimension that is a positive multiple of "
                          f"{BLOCK_SIZE // 2} (K a multiple of {BLOCK_SIZE}), got shape {p.shape}")
    s = np.asarray(scales)
    if s.dtype != np.uint8 and s.dtype != np.dtype(E4M3):
        raise FormatError(f"{name_scales}: expected float8_e4m3fn or uint8, got dtype {s.dtype}")
    s = s.view(np.uint8)
    want = p.shape[:-1] + (2 * p.shape[-1] // BLOCK_SIZE,)
    if s.shape != want:
        raise FormatError(f"{name_scales}: expected shape {want} for packed {p.shape}, "
                          f"got {s.shape}")
    return p, s


@functools.lru_cache(maxsize=8)
def _pair_table(g_bits, dtype):
    """Read-only [65536] table: (scale byte << 8 | packed byte) -> both elements' final values
    (one item of two dtype values), for the float32 global whose bits are g_bits."""
    g = np.uint32(g_bits).view(np.float32)
    factor = (_E4M3_BYTES * g).astype(np.float32).astype(dtype)          # [256] fp32(fp32(s) * g)
    with np.errstate(over="ignore"):                                     # float32 values past 3.4e38: inf
        table = (_PAIRS.astype(dtype)[None] * factor[:, None, None]).view(_PAIR_ITEM[dtype]).reshape(65536)
    table.flags.writeable = False
    return table


def dequantize(packed, weight_scale, weight_scale_2, dtype=np.float32, out=None):
    """Exact NVFP4 decode: packed [..., K/2], scales [..., K/16], global 0-d -> values [..., K].

    factor = fp32(fp32(weight_scale) * weight_scale_2) per block; value = e2m1 * factor, rounded
    to float32 (dtype=float32) or exact (dtype=float64). Also decodes activations
    (scales from quantize_activation, global = input_scale). `out`: an optional writeable
    C-contiguous array of that dtype and shape [..., K] to write into (a reused buffer, no fresh
    pages); it is returned.
    """
    p, sb = _check_triplet(packed, weight_scale)
    g = _scalar_f32(weight_scale_2, "weight_scale_2")
    dtype = _decode_dtype(dtype)
    k = 2 * p.shape[-1]
    out = _check_out(out, p.shape[:-1] + (k,), dtype)
    item = _PAIR_ITEM[dtype]                                            # two values per item
    pairs_out = out.reshape(-1, k).view(item)                           # [R, K/2] pairs
    if sb.size < _SMALL_BLOCKS:                                         # per-block multiply
        np.take(_PAIRS.astype(dtype).view(item).reshape(256), p.reshape(pairs_out.shape),
                out=pairs_out, mode="wrap")
        blocks = out.reshape(sb.shape + (BLOCK_SIZE,))
        blocks *= (_E4M3_BYTES[sb] * g).astype(np.float32).astype(dtype)[..., None]
        return out
    _decode_pairs(p.reshape(pairs_out.shape), sb.reshape(-1, k // BLOCK_SIZE),
                  _pair_table(int(g.view(np.uint32)), dtype), pairs_out)
    return out


def row_decoder(packed, weight_scale, weight_scale_2, dtype=np.float64):
    """dequantize for row ranges of one 2-D weight, checked and set up once: packed [N, K/2],
    scales [N, K/16], global 0-d -> decode(rows: slice, out [n, K]) -> out, the exact values of
    those rows (as dequantize) written into `out`, a writeable C-contiguous array of `dtype` (a
    reused buffer). For a weight decoded a block of rows at a time, many times (ref.weights)."""
    p, sb = _check_triplet(packed, weight_scale)
    if p.ndim != 2:
        raise FormatError(f"packed: expected a 2-D weight [N, K/2], got shape {p.shape}")
    g = _scalar_f32(weight_scale_2, "weight_scale_2")
    dtype = _decode_dtype(dtype)
    table = _pair_table(int(g.view(np.uint32)), dtype)
    k = 2 * p.shape[1]

    def decode(rows: slice, out: np.ndarray) -> np.ndarray:
        pr, sr = p[rows], sb[rows]
        out = _check_out(out, (pr.shape[0], k), dtype)
        _decode_pairs(pr, sr, table, out.view(_PAIR_ITEM[dtype]))
        return out
    return decode


def _decode_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in _PAIR_ITEM:
        raise FormatError(f"dtype: expected float32 or float64, got {dtype}")
    return dtype


def _check_out(out, shape, dtype):
    """A fresh array, or `out` checked to be a writeable C-contiguous dtype array of that shape."""
    if out is None:
        return np.empty(shape, dtype)
    if not (isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == shape
            and out.flags.c_contiguous and out.flags.writeable):
        raise FormatError(f"out: expected a writeable C-contiguous {dtype} array of shape {shape}, "
                          f"got {getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
    return out


# scale byte s -> four uint16 lanes of (s << 8), whatever the byte order (all four lanes are equal)
_HIGH_BYTE_LANES = np.uint64(0x0100010001000100)


def _decode_pairs(p2, s2, table, pairs_out):
    """Table decode: packed bytes p2 [R, K/2], scale bytes s2 [R, K/16] -> pairs_out [R, K/2] (one
    item of two values per packed byte), about _CHUNK values a step. The table index of a packed
    byte is (its block's scale byte << 8) | byte: the scale part is built eight bytes at a time (one
    uint64 holds four lanes of s << 8; two of them cover a block's eight bytes), then or-ed with the
    bytes straight into the index array."""
    rows, half = p2.shape
    nb = half // (BLOCK_SIZE // 2)                                      # blocks per row
    chunks = _row_chunks(rows, half)
    step = chunks[0][1] if chunks else 0
    high = np.empty((step, nb, 2), np.uint64)                          # [r, K/16, 2]: s << 8, 8 lanes
    idx = np.empty((step, half), np.intp)                              # [r, K/2] table indices
    for r0, r1 in chunks:
        n = r1 - r0
        lanes = s2[r0:r1].astype(np.uint64) * _HIGH_BYTE_LANES          # [n, K/16]
        high[:n, :, 0] = lanes
        high[:n, :, 1] = lanes
        np.bitwise_or(high[:n].view(np.uint16).reshape(n, half), p2[r0:r1], out=idx[:n])
        np.take(table, idx[:n], out=pairs_out[r0:r1], mode="wrap")


# ---------------------------------------------------------------------------------------------
# activations (the engines' CUDA quantizer)


def quantize_activation(x, input_scale, sign="cuda", global_scale=None):
    """Engine activation quantizer: x [..., K] -> (packed uint8 [..., K/2], scales e4m3 [..., K/16]).

    x is used as given (engines quantize bf16 activations; float64 is rounded to float32 first).
    float32 operations in this order,
    with exact reciprocals; the GPUs' rcp.approx.ftz can differ by one ulp and so flip a code next
    to an E2M1 midpoint (spec/nvfp4.md section 5):
      G = global_scale if given, else fp32(1 / input_scale); vmax = max|x| over the block (NaN ignored)
      SF = fp32(G * fp32(vmax * fp32(1/6))); scale = e4m3 saturating(SF)
      out_scale = fp32(1 / fp32(fp32(scale) * fp32(1 / G))), or 0 when scale == 0
      codes = encode_e2m1(fp32(x) * out_scale, sign)
    global_scale: the quantization-direction global G as the engine holds it, used unchanged
    (vLLM's compressed-tensors dense linears and KV caches pass the stored multiplier); then
    input_scale may be None.
    """
    if sign not in SIGN_RULES:
        raise FormatError(f"sign: expected one of {SIGN_RULES}, got {sign!r}")
    a = _float_array(x, "x")
    _check_blocked(a, "x")
    if global_scale is not None:
        g = _scalar_f32(global_scale, "global_scale", positive=True)[()]
    else:
        g = np.float32(1) / _scalar_f32(input_scale, "input_scale", positive=True)[()]
    rg, r6 = np.float32(1) / g, np.float32(1) / np.float32(E2M1_MAX)
    k = a.shape[-1]
    x2 = a.reshape(-1, k)                                              # [R, K]
    packed = np.empty((x2.shape[0], k // 2), np.uint8)                 # [R, K/2]
    scales = np.empty((x2.shape[0], k // BLOCK_SIZE), E4M3)            # [R, K/16]
    for r0, r1 in _row_chunks(x2.shape[0], k):
        xc = x2[r0:r1].astype(np.float32)                              # [r, K]
        vmax = _block_amax(xc)                                         # [r, K/16]
        nan = np.isnan(vmax)
        if nan.any():                                                  # the max skips NaN elements
            vmax[nan] = np.fmax.reduce(np.abs(xc).reshape(r1 - r0, -1, BLOCK_SIZE)[nan], axis=-1)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            sf = g * (vmax * r6)
            s8 = np.minimum(sf, np.float32(E4M3_MAX)).astype(E4M3)     # saturating, NaN stays
            s = s8.astype(np.float32)
            out_scale = np.where(s != 0, np.float32(1) / (s * rg), np.float32(0)).astype(np.float32)
            y = xc.reshape(r1 - r0, -1, BLOCK_SIZE) * out_scale[..., None]
        packed[r0:r1] = _pack(_encode_f32(y.reshape(-1), sign).reshape(r1 - r0, k))
        scales[r0:r1] = s8
    return packed.reshape(a.shape[:-1] + (k // 2,)), scales.reshape(a.shape[:-1] + (k // BLOCK_SIZE,))


# ---------------------------------------------------------------------------------------------
# GEMM


_OUT_DTYPES = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16))


def round_scaled(acc, alpha, dtype):
    """dtype(alpha * acc) with one rounding: acc float64 [...], alpha a float32 scalar (the GEMM
    epilogue of NVFP4 and FP8 kernels, emulated exactly: Dekker product, round to odd, then once
    to dtype)."""
    a = np.float64(alpha)
    p = acc * a
    if dtype == np.float64:
        return p
    with np.errstate(over="ignore", invalid="ignore"):
        c = acc * 134217729.0                                   # Veltkamp split: 26 + 27 bits
        hi = c - (c - acc)
        e = (a * hi - p) + a * (acc - hi)                       # Dekker: p + e == a * acc
        inexact = (e != 0) & np.isfinite(p)
        above = inexact & ((e > 0) != (p > 0))                  # |p| exceeds the exact value
    p = np.where(above, np.nextafter(p, 0), p)
    odd = (p.view(np.uint64) | inexact.astype(np.uint64)).view(np.float64)   # round to odd
    with np.errstate(over="ignore"):                            # beyond the range: IEEE inf
        if dtype == np.float32:
            return odd.astype(np.float32)                       # then one correct rounding
        return _to_float32_odd(odd).astype(dtype)


def _block_values(packed, scales):
    """e2m1(code) * fp32(scale), exact in float64: [..., K/2], [..., K/16] -> [..., K]."""
    return dequantize(packed, scales, np.float32(1), dtype=np.float64)


def nvfp4_matmul(x, packed, weight_scale, weight_scale_2, input_scale=None, dtype=np.float64,
                 sign="cuda", global_scale=None):
    """x [..., K] @ W.T for an NVFP4 weight W [N, K] -> [..., N] in dtype (float64, float32, bf16).

    W4A4 (input_scale given): x is quantized by quantize_activation(x, input_scale, sign,
      global_scale);
      acc = sum_b sa[m, b] * sw[n, b] * sum_{k in b} a * w  (every product and block sum exact,
      accumulated in float64); out = dtype(alpha * acc), rounded once,
      alpha = fp32(input_scale * weight_scale_2).
    W4A16 (input_scale None): out = dtype(x @ dequantize(W, float64).T), the matmul in float64.
    """
    dtype = np.dtype(dtype)
    if dtype not in _OUT_DTYPES:
        raise FormatError(f"dtype: expected float64, float32 or bfloat16, got {dtype}")
    p, sw = _check_triplet(packed, weight_scale)
    if p.ndim != 2:
        raise FormatError(f"packed: expected a 2-D weight [N, K/2], got shape {p.shape}")
    g = _scalar_f32(weight_scale_2, "weight_scale_2")
    a = _float_array(x, "x")
    k = 2 * p.shape[1]
    if a.ndim < 1 or a.shape[-1] != k:
        raise FormatError(f"x: expected last dimension K = {k} (packed {p.shape}), "
                          f"got shape {a.shape}")
    if input_scale is None:
        w = dequantize(p, sw, g, dtype=np.float64)                           # [N, K]
        return round_scaled(a.astype(np.float64) @ w.T, np.float32(1), dtype)
    s_in = _scalar_f32(input_scale, "input_scale", positive=True)
    pa, sa = quantize_activation(a, s_in, sign=sign, global_scale=global_scale)
    xa = _block_values(pa, sa)                                               # [..., K]
    wb = _block_values(p, sw)                                                # [N, K]
    return round_scaled(xa @ wb.T, np.float32(s_in * g), dtype)           # [..., N]


# ---------------------------------------------------------------------------------------------
# CUTLASS 128x4 scale-factor layout


def _padded(m, kb):
    return (-(-m // SWIZZLE_ROWS) * SWIZZLE_ROWS, -(-kb // SWIZZLE_COLS) * SWIZZLE_COLS)


def swizzle_scales(scales):
    """Linear block scales [..., M, K/16] -> CUTLASS SM100 layout [..., M', K'] (same dtype).

    Rows padded to M' = ceil(M/128)*128, columns to K' = ceil(K/16 / 4)*4, padding zero. The
    C-order flat index of element (m, kb) is
      (m // 128) * (K'/4) * 512 + (kb // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + kb % 4.
    """
    s = np.asarray(scales)
    if s.ndim < 2 or s.dtype.itemsize != 1:
        raise FormatError(f"scales: expected a 1-byte array [..., M, K/16], "
                          f"got dtype {s.dtype} shape {s.shape}")
    lead, (m, kb) = s.shape[:-2], s.shape[-2:]
    mp, kp = _padded(m, kb)
    pad = np.zeros(lead + (mp, kp), dtype=np.uint8)
    pad[..., :m, :kb] = s.view(np.uint8)
    n = len(lead)
    tiles = pad.reshape(lead + (mp // 128, 4, 32, kp // 4, 4))               # tile, m/32, m%32, kt, k%4
    order = tuple(range(n)) + tuple(n + i for i in (0, 3, 2, 1, 4))
    return np.ascontiguousarray(tiles.transpose(order)).reshape(lead + (mp, kp)).view(s.dtype)


def unswizzle_scales(swizzled, m, kb):
    """Inverse of swizzle_scales: [..., M', K'] -> linear [..., m, kb] (padding dropped)."""
    s = np.asarray(swizzled)
    if s.ndim < 2 or s.dtype.itemsize != 1:
        raise FormatError(f"swizzled: expected a 1-byte array [..., M', K'], "
                          f"got dtype {s.dtype} shape {s.shape}")
    lead = s.shape[:-2]
    if s.shape[-2:] != _padded(m, kb):
        raise FormatError(f"swizzled: expected padded shape {_padded(m, kb)} for {m} rows x "
                          f"{kb} scale columns, got {s.shape[-2:]}")
    mp, kp = _padded(m, kb)
    n = len(lead)
    tiles = s.view(np.uint8).reshape(lead + (mp // 128, kp // 4, 32, 4, 4))  # tile, kt, m%32, m/32, k%4
    order = tuple(range(n)) + tuple(n + i for i in (0, 3, 2, 1, 4))
    lin = np.ascontiguousarray(tiles.transpose(order)).reshape(lead + (mp, kp))
    return np.ascontiguousarray(lin[..., :m, :kb]).view(s.dtype)

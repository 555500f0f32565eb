"""Slow, independent oracles for the NVFP4 tests: exact rationals, bit formulas, scalar loops.

Nothing here imports ref.nvfp4; values are derived from the bit layouts and fractions.Fraction.
"""
import math
from fractions import Fraction

import numpy as np

F32 = np.float32


def e2m1_value(code: int) -> float:
    """Bit formula: s e1 e0 m, bias 1, subnormal when e == 0."""
    s, e, m = code >> 3, (code >> 1) & 3, code & 1
    mag = m * 0.5 if e == 0 else 2.0 ** (e - 1) * (1 + m / 2)
    return -mag if s else mag


def e4m3_value(byte: int) -> float:
    """Bit formula for float8_e4m3fn: bias 7, no inf, S.1111.111 is NaN."""
    s, e, m = byte >> 7, (byte >> 3) & 15, byte & 7
    if e == 15 and m == 7:
        return math.nan
    mag = m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
    return -mag if s else mag


_E2M1_MAGS = [Fraction(e2m1_value(c)) for c in range(8)]
_E4M3_MAGS = [Fraction(e4m3_value(b)) for b in range(127)]


def _nearest_even(f: Fraction, grid: list) -> int:
    """Index of the grid value nearest to f >= 0; ties to the even index; beyond the end -> last."""
    lo, hi = 0, len(grid) - 1
    if f >= grid[hi]:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if grid[mid] <= f:
            lo = mid
        else:
            hi = mid
    dlo, dhi = f - grid[lo], grid[hi] - f
    if dlo != dhi:
        return lo if dlo < dhi else hi
    return lo if lo % 2 == 0 else hi


def e2m1_code(v: float, sign: str) -> int:
    """Nearest E2M1 code, ties to even, saturating; NaN -> 7; sign rule 'modelopt' or 'cuda'."""
    if math.isnan(v):
        return 7
    neg = v < 0 if sign == "modelopt" else math.copysign(1.0, v) < 0
    idx = 7 if math.isinf(v) else _nearest_even(abs(Fraction(v)), _E2M1_MAGS)
    return idx | (8 if neg else 0)


def e4m3_byte(v: float, saturate: bool = True) -> int:
    """Nearest float8_e4m3fn byte, ties to even; |v| > 448 -> 448 (saturate) or NaN above 464."""
    sign = 0x80 if math.copysign(1.0, v) < 0 else 0
    if math.isnan(v):
        return 0x7F | sign
    if not saturate and abs(v) >= 464:
        return 0x7F | sign
    idx = 126 if math.isinf(v) else _nearest_even(abs(Fraction(v)), _E4M3_MAGS)
    return idx | sign


def round_binary(f: Fraction, bits: int, emin: int = -126, emax: int = 127) -> float:
    """Exact rational -> nearest binary float with `bits` significant bits (subnormals below
    2^emin, overflow to inf past the largest finite value), ties to even."""
    if f == 0:
        return 0.0
    a = abs(f)
    e = a.numerator.bit_length() - a.denominator.bit_length()    # 2^e <= a < 2^(e+2)
    while Fraction(2) ** e > a:
        e -= 1
    while Fraction(2) ** (e + 1) <= a:
        e += 1
    e = max(e, emin)
    q = a / Fraction(2) ** (e - bits + 1)
    n = math.floor(q)
    rem = q - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2 == 1):
        n += 1
    r = n * Fraction(2) ** (e - bits + 1)
    out = math.inf if r >= Fraction(2) ** (emax + 1) else float(r)
    return -out if f < 0 else out


def bf16_round(v: float) -> float:
    """Nearest bfloat16 value (8 significant bits, exponent >= -126 with subnormals), ties to even."""
    if math.isnan(v) or math.isinf(v) or v == 0:
        return v
    return round_binary(Fraction(v), 8)


def modelopt_weight(w32: np.ndarray, recipe: str, global_scale=None):
    """Scalar-loop ModelOpt export of a float32 [R, K] matrix -> (codes [R, K], scale bytes
    [R, K/16], weight_scale_2 float32)."""
    rows, k = w32.shape
    amax = F32(np.max(np.abs(w32))) if global_scale is None else F32(global_scale)
    g = F32(amax / F32(2688))
    d = F32(F32(6) * g)
    codes = np.zeros((rows, k), np.uint8)
    sbytes = np.zeros((rows, k // 16), np.uint8)
    with np.errstate(divide="ignore", invalid="ignore"):
        for r in range(rows):
            for b in range(k // 16):
                blk = [F32(x) for x in w32[r, 16 * b:16 * b + 16]]
                s = F32(max(abs(x) for x in blk) / d)
                if s == 0:
                    s = F32(1)
                if recipe == "modelopt-0.45":
                    s = F32(min(max(float(s), 2.0 ** -9), 448.0))
                byte = e4m3_byte(float(s), saturate=False)
                sbytes[r, b] = byte
                den = F32(F32(e4m3_value(byte)) * g)
                for j, x in enumerate(blk):
                    codes[r, 16 * b + j] = e2m1_code(float(F32(x / den)), "modelopt")
    return codes, sbytes, g


def engine_activation(x32: np.ndarray, input_scale: float, sign: str = "cuda", global_scale=None):
    """Scalar-loop CUDA activation quantizer with exact reciprocals: float32 [R, K] ->
    (codes [R, K], scale bytes [R, K/16]); global_scale: G used as given."""
    rows, k = x32.shape
    g = F32(F32(1) / F32(input_scale)) if global_scale is None else F32(global_scale)
    r6 = F32(F32(1) / F32(6))
    codes = np.zeros((rows, k), np.uint8)
    sbytes = np.zeros((rows, k // 16), np.uint8)
    with np.errstate(over="ignore", invalid="ignore"):
        for r in range(rows):
            for b in range(k // 16):
                blk = [F32(x) for x in x32[r, 16 * b:16 * b + 16]]
                finite_or_inf = [abs(float(x)) for x in blk if not math.isnan(x)]
                vmax = F32(max(finite_or_inf)) if finite_or_inf else F32(math.nan)
                sf = F32(g * F32(vmax * r6))
                byte = e4m3_byte(float(sf), saturate=True)
                sbytes[r, b] = byte
                s = F32(e4m3_value(byte))
                osc = F32(0) if s == 0 else F32(F32(1) / F32(s * F32(F32(1) / g)))
                for j, x in enumerate(blk):
                    codes[r, 16 * b + j] = e2m1_code(float(F32(x * osc)), sign)
    return codes, sbytes


def e4m3_byte_torch(v: float) -> int:
    """torch's classic float -> float8_e4m3fn cast (c10 fp8e4m3fn_from_fp32_value, before it
    saturated): nearest, ties to even; |v| > 464, +-inf and NaN give NaN (0x7F | sign)."""
    sign = 0x80 if math.copysign(1.0, v) < 0 else 0
    if math.isnan(v) or math.isinf(v) or abs(v) > 464:
        return 0x7F | sign
    return e4m3_byte(v, saturate=True)


def fp8_per_tensor_byte(x: float, scale: float, rule: str) -> int:
    """Exact-rational model of one element of ref.fp8.quantize_fp8 (x a float32 value, finite)."""
    def f32(f):
        return round_binary(f, 24)

    s = Fraction(scale)
    if rule == "divide":
        y = f32(Fraction(x) / s)
    elif rule == "reciprocal":
        y = f32(Fraction(x) * Fraction(f32(1 / s)))
    else:  # sglang: bf16(fp32(x / bf16(scale))), then torch's cast
        s16 = Fraction(round_binary(s, 8))
        y = round_binary(Fraction(f32(Fraction(x) / s16)), 8)
        y = math.copysign(abs(y), x) if y == 0 else y
        return e4m3_byte_torch(y)
    y = math.copysign(abs(y), x) if y == 0 else y
    return e4m3_byte(y, saturate=True)


def ct_weight(w32: np.ndarray, global_amax=None):
    """Scalar-loop compressed-tensors NVFP4 recipe (ref.nvfp4.quantize_weight_ct) of a float32
    [R, K] matrix -> (codes [R, K], scale bytes [R, K/16], global float32)."""
    rows, k = w32.shape
    amax = F32(np.max(np.abs(w32))) if global_amax is None else F32(global_amax)
    g = F32(F32(2688) / amax)
    codes = np.zeros((rows, k), np.uint8)
    sbytes = np.zeros((rows, k // 16), np.uint8)
    with np.errstate(divide="ignore", invalid="ignore"):
        for r in range(rows):
            for b in range(k // 16):
                blk = [F32(x) for x in w32[r, 16 * b:16 * b + 16]]
                sf = F32(g * F32(max(abs(x) for x in blk) / F32(6)))
                byte = e4m3_byte(float(sf), saturate=True)
                sbytes[r, b] = byte
                f = F32(F32(e4m3_value(byte)) / g)
                for j, x in enumerate(blk):
                    codes[r, 16 * b + j] = e2m1_code(float(F32(x / f)), "modelopt")
    return codes, sbytes, g

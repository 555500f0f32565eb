"""spec/vectors/vision: every committed case recomputed with ref equals the file, and a few cases
against independent loops (the rotary and the interpolation by their scalar formulas)."""
import math

import numpy as np
import pytest

from ref import vision_vectors as VV

FILES = sorted(VV.DEFAULT_DIR.glob("*.safetensors"))


def test_every_case_is_committed():
    assert {p.stem for p in FILES} == set(VV.cases())


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_case_recomputes(path):
    function, inputs, scalars, outputs = VV.read(path)
    got = VV.evaluate(function, inputs, scalars)
    assert set(got) == set(outputs)
    for name, want in outputs.items():
        if np.issubdtype(want.dtype, np.integer) or want.dtype == np.float32:
            assert np.array_equal(got[name], want), name           # ids, positions, sizes, pixels: exact
        else:
            np.testing.assert_allclose(got[name], want, rtol=1e-12, atol=1e-12, err_msg=name)


def test_rope_case_by_scalar_formulas():
    _, a, s, o = VV.read(VV.DEFAULT_DIR / "vision_rope.safetensors")
    hd, theta = s["head_dim"], s["theta"]
    for n, (row, col) in enumerate(o["positions"]):
        for d in range(hd // 2):
            k = d % (hd // 4)
            angle = (row if d < hd // 4 else col) * theta ** (-2 * k / (hd // 2))
            assert math.isclose(o["cos"][n, d], math.cos(angle), abs_tol=1e-14)
            assert o["cos"][n, d] == o["cos"][n, d + hd // 2]
            x = a["x"][n, :, d], a["x"][n, :, d + hd // 2]
            np.testing.assert_allclose(o["y"][n, :, d], x[0] * math.cos(angle) - x[1] * math.sin(angle), atol=1e-14)
            np.testing.assert_allclose(o["y"][n, :, d + hd // 2], x[1] * math.cos(angle) + x[0] * math.sin(angle),
                                       atol=1e-14)


def test_pos_embed_case_by_bilinear_formula():
    _, a, s, o = VV.read(VV.DEFAULT_DIR / "pos_embed.safetensors")
    side, m = math.isqrt(len(a["table"])), s["merge_size"]
    table = a["table"].reshape(side, side, -1)
    n = 0
    for _, h, w in a["grids"]:
        for bi in range(h // m):
            for bj in range(w // m):
                for i in range(m):
                    for j in range(m):
                        r, c = bi * m + i, bj * m + j
                        sy = r * (side - 1) / (h - 1) if h > 1 else 0.0
                        sx = c * (side - 1) / (w - 1) if w > 1 else 0.0
                        y0, x0 = math.floor(sy), math.floor(sx)
                        y1, x1 = min(y0 + 1, side - 1), min(x0 + 1, side - 1)
                        fy, fx = sy - y0, sx - x0
                        want = ((1 - fy) * (1 - fx) * table[y0, x0] + (1 - fy) * fx * table[y0, x1]
                                + fy * (1 - fx) * table[y1, x0] + fy * fx * table[y1, x1])
                        np.testing.assert_allclose(o["y"][n], want, rtol=1e-13, atol=1e-13)
                        n += 1
    assert n == len(o["y"])

"""bench/jax_bench.py's fair count of a decode step's traffic: widened_weight_bytes finds, in XLA:CPU's
optimized HLO, what widening bf16 weights to float32 for its matrix-vector dots is charged."""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from jax_bench import widened_weight_bytes  # noqa: E402

O, K = 1024, 512


def _compiled(dtype):
    f = jax.jit(lambda w, x: jnp.einsum("...i,oi->...o", x, w, preferred_element_type=jnp.float32))
    return f.lower(jax.ShapeDtypeStruct((O, K), dtype), jax.ShapeDtypeStruct((1, K), dtype)).compile()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's widening of bf16 dots")
def test_widened_bf16_weight_is_the_copy_and_the_wider_read():
    """bf16 weight [O, K] times one row: the f32 copy charged 2 + 4 bytes per weight and the dot's read
    of it 4, so 8 bytes per weight beyond the 2 a bf16 read costs; what is left is that read plus the
    row and the output (under 2%)."""
    c = _compiled(jnp.bfloat16)
    got = widened_weight_bytes(c.as_text())
    assert got == 8 * O * K
    rest = c.cost_analysis()["bytes accessed"] - got
    assert 2 * O * K <= rest <= 1.02 * 2 * O * K


def test_float32_weight_is_not_widened():
    assert widened_weight_bytes(_compiled(jnp.float32).as_text()) == 0

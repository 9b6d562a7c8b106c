"""Optional cross-check against NATTEN itself (skipped unless ``natten`` and ``torch`` import).

NATTEN is not on PyPI for CPU; run with a checkout on the path:
``PYTHONPATH=<NATTEN>/src JAX_PLATFORMS=cpu python -m pytest tests/ops/test_neighborhood_natten.py``.
"""
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from jattn.ops.neighborhood import neighborhood_attention

torch = pytest.importorskip("torch")
natten_functional = pytest.importorskip("natten.functional")

CASES = [  # shape, kernel, stride, dilation, causal
    ((37,), (6,), (3,), (2,), (False,)),
    ((12, 13), (5, 4), (2, 1), (2, 1), (False, True)),
    ((6, 7, 5), (3, 3, 2), (1, 2, 1), (1, 2, 1), (True, False, False)),
    ((20, 18), (8, 6), (8, 6), (1, 1), (False, False)),
    ((33,), (9,), (4,), (3,), (True,)),
]


@pytest.mark.parametrize("shape, kernel, stride, dilation, causal", CASES)
def test_matches_natten_flex_backend(shape, kernel, stride, dilation, causal):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, *shape, 2, 16)).astype(np.float32) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = natten_functional.neighborhood_attention_generic(
            *(torch.from_numpy(x) for x in (q, k, v)), kernel_size=kernel, stride=stride, dilation=dilation,
            is_causal=causal, backend="flex-fna").numpy()
    got = neighborhood_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), kernel, stride=stride,
                                 dilation=dilation, causal=causal, impl="xla")
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=0)

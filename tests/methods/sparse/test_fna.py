"""P60 FasterNA: the paper's correctness properties of neighborhood attention."""
import jax.numpy as jnp
import numpy as np

import jattn
from jattn.methods.sparse.fna import na_attention, neighborhood_mask
from tests.conftest import assert_close
from tests.ops.test_neighborhood import flat, grid_qkv, natten_mask


def test_na_equals_dense_attention_with_the_mask():
    shape, kernel, dilation = (9, 11), (3, 5), (2, 1)
    q, k, v = grid_qkv(12, shape, H=2, Hkv=2)
    mask = natten_mask(shape, kernel, (1, 1), dilation, (False, False))
    np.testing.assert_array_equal(neighborhood_mask(shape, kernel, dilation), mask)
    want = jattn.reference_attention(flat(q), flat(k), flat(v), mask=jnp.asarray(mask)).reshape(q.shape)
    assert_close(na_attention(q, k, v, kernel, dilation), want)


def test_every_query_sees_the_kernel_volume_and_k1_is_identity():
    assert np.all(neighborhood_mask((6, 5, 7), (3, 5, 2)).sum(axis=1) == 30)
    q, k, v = grid_qkv(13, (4, 3, 5), H=2, Hkv=2)
    assert_close(na_attention(q, k, v, 1), v)


def test_causal_full_window_is_causal_attention():
    q, k, v = grid_qkv(14, (31,), H=2, Hkv=1)
    assert_close(na_attention(q, k, v, 31, causal=True), jattn.reference_attention(q, k, v, causal=True))

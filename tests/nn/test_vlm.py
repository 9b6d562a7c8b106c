"""TinyVLM (jattn.nn.vlm): the prefix-LM mask, variable image tokens, attention maps, greedy decoding, errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.nn.vlm import TinyVLM, greedy_decode, make_generate_fn, prefix_lm_mask, token_layout

V, N, T = 11, 16, 6     # vocabulary, image tokens (16x16 images, patches of 4), text tokens


@functools.lru_cache(maxsize=1)
def shared():
    """One model for the tests that do not change it (building one costs more than using it)."""
    return tiny()


def tiny(seed=0, **kwargs):
    config = dict(image_size=16, patch_size=4, dim=16, encoder_layers=1, decoder_layers=2, num_heads=2,
                  mlp_dim=32, max_text_len=8, stem_channels=4, stem_layers=1)
    config.update(kwargs)
    return TinyVLM(V, rngs=nnx.Rngs(seed), **config)


# One compiled forward (with maps) and one compiled decode shared by the tests: few compiles, fast file.
forward = nnx.jit(lambda model, images, tokens: model(images, tokens, return_probs=True))
decode = nnx.jit(lambda model, image_tokens, tokens, image_mask: model.decode(image_tokens, tokens,
                                                                                image_mask=image_mask))


def inputs(seed=0, batch=2):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.uniform(size=(batch, 16, 16, 3)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, V, (batch, T)), jnp.int32)
    return images, tokens


def test_prefix_lm_mask_hand_built():
    """The exact pattern for 2 image + 3 text tokens; catches a causal prefix, text hidden from image rows
    being visible, or an off-by-one in the text diagonal."""
    expected = np.array([[1, 1, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 0],
                         [1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(np.asarray(prefix_lm_mask(2, 3))[0, 0], expected)
    dropped = np.asarray(prefix_lm_mask(2, 3, jnp.array([[True, False]])))[0, 0]
    want = expected.copy()
    want[:, 1] = False
    want[1, 1] = True           # a dropped token's own row keeps itself (no fully masked row)
    np.testing.assert_array_equal(dropped, want)
    layout = token_layout(2, 3)
    assert layout["image"] == slice(0, 2) and layout["text"] == slice(2, 5)
    np.testing.assert_array_equal(layout["is_image"], [True, True, False, False, False])


def test_text_is_causal():
    """Changing text token t+1 leaves the logits at positions <= t unchanged and changes those after:
    catches a decoder that lets text see the future (no causal mask, or a window off by one)."""
    model = shared()
    images, tokens = inputs()
    t = 2
    changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % V)
    (a, _), (b, _) = forward(model, images, tokens), forward(model, images, changed)
    np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-6)
    assert np.all(np.abs(np.asarray(a[:, t + 1:] - b[:, t + 1:])).max(axis=-1) > 1e-4)


def test_image_tokens_visible_to_all_text_and_blind_to_text():
    """Perturbing one image patch changes every text position's logits (text sees the image prefix), and
    the maps give image rows zero weight on text columns: catches a decoder whose text misses the image
    or whose image tokens read the caption."""
    model = shared()
    images, tokens = inputs()
    other = images.at[:, 4:8, 8:12].add(0.5)
    a, maps = forward(model, images, tokens)
    b, _ = forward(model, other, tokens)
    assert np.all(np.abs(np.asarray(a - b)).max(axis=-1) > 1e-5)
    assert len(maps) == 2 and maps[0].shape == (2, 2, N + T, N + T)
    for probs in maps:
        probs = np.asarray(probs)
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
        assert probs[:, :, :N, N:].max() == 0.0
        assert probs[:, :, N:, :N].sum(-1).min() > 0.0


def test_image_mask_equals_removing_tokens():
    """Masking image tokens out equals dropping them from the sequence (the decoder has no image positions),
    so DyMU-style merging/dropping may change N: catches a mask that is ignored or position leakage."""
    model = shared()
    _, tokens = inputs(3)
    image_tokens = jax.random.normal(jax.random.key(3), (2, N, 16))
    keep = np.ones((2, N), bool)
    keep[:, [1, 4, 9]] = False
    masked = decode(model, image_tokens, tokens, jnp.asarray(keep))
    removed = decode(model, image_tokens[:, keep[0]], tokens, jnp.ones((2, N - 3), bool))
    np.testing.assert_allclose(masked, removed, atol=1e-5)
    full = decode(model, image_tokens, tokens, jnp.ones((2, N), bool))
    assert np.abs(np.asarray(full - masked)).max() > 1e-5


@functools.lru_cache(maxsize=3)
def stem_model(stem_layers):
    return tiny(stem_channels=4 if stem_layers else 0, stem_layers=max(stem_layers, 1), decoder_layers=1)


def changed_tokens(model, images, y, x):
    """Which of ``embed_patches``' tokens move when pixel ``(y, x)`` of every image is perturbed."""
    a = np.asarray(model.embed_patches(images))
    b = np.asarray(model.embed_patches(images.at[:, y, x].add(0.7)))
    return set(np.flatnonzero(np.abs(a - b).max(axis=(0, 2)) > 1e-6).tolist())


@pytest.mark.parametrize("stem_layers, pixel, expected", [
    (0, (3, 3), {0}),                  # no stem: a pixel reaches only its own patch
    (1, (3, 3), {0, 1, 4, 5}),         # 3x3 conv: pixels 2..4 in each axis -> patches 0 and 1
    (1, (5, 5), {5}),                  # pixels 4..6: all inside patch 1
    (2, (5, 5), {0, 1, 4, 5}),         # two convs: pixels 3..7 -> patches 0 and 1
    (2, (6, 6), {5, 6, 9, 10}),        # pixels 4..8 -> patches 1 and 2
    (2, (0, 15), {3}),                 # the top-right corner stays in the top-right token
])
def test_stem_is_local_and_keeps_the_token_grid(stem_layers, pixel, expected):
    """A perturbed pixel changes exactly the tokens whose patches lie within ``stem_layers`` pixels of it
    (4x4 grid of patches of 4 on 16x16 images, row-major): catches a stem that is skipped (neighbours
    unchanged), shifted or strided (grid misaligned), a transposed patchify (rows for columns), or a
    stem with the wrong number of layers (wrong reach)."""
    model = stem_model(stem_layers)
    images, _ = inputs(5)
    assert changed_tokens(model, images, *pixel) == expected
    assert len(model.stem) == stem_layers


def test_greedy_decode_stops_at_eos():
    """A hand-built causal logits function: row 0 says 5 then eos (then would say 7), row 1 never says eos.
    Catches writing tokens after eos and an off-by-one in where step t writes."""
    pad, bos, eos, L = 0, 1, 2, 6

    def logits_fn(buffer):
        t = jnp.arange(L)[None, :]
        row = jnp.arange(buffer.shape[0])[:, None]
        token = jnp.where(row == 0, jnp.where(t == 0, 5, jnp.where(t == 1, eos, 7)), 3 + t)
        return jax.nn.one_hot(token, 10) * 10.0

    out = np.asarray(greedy_decode(logits_fn, 2, L, bos=bos, eos=eos, pad=pad))
    np.testing.assert_array_equal(out, [[bos, 5, eos, pad, pad, pad], [bos, 3, 4, 5, 6, 7]])


def test_generate_stops_when_eos_wins():
    """A model whose head always prefers eos emits bos, eos, then pads; with another word preferred it fills
    the buffer: the compiled generator wires greedy_decode to the model's decoder."""
    model = tiny()
    image_tokens = jax.random.normal(jax.random.key(0), (2, N, 16))
    graphdef, _ = nnx.split(model)
    generate = make_generate_fn(graphdef, bos=1, eos=2, pad=0, max_len=5)
    model.head.bias[...] = jnp.zeros(V).at[2].set(100.0)
    out = np.asarray(generate(nnx.state(model), image_tokens, None))
    np.testing.assert_array_equal(out, [[1, 2, 0, 0, 0]] * 2)
    model.head.bias[...] = jnp.zeros(V).at[7].set(100.0)
    np.testing.assert_array_equal(np.asarray(generate(nnx.state(model), image_tokens, None)), [[1, 7, 7, 7, 7]] * 2)


def test_bad_arguments_raise_naming_them():
    """Each bad argument names itself."""
    model = shared()
    images, tokens = inputs()
    with pytest.raises(ValueError, match="images"):
        model(jnp.zeros((2, 32, 32, 3)), tokens)
    with pytest.raises(ValueError, match="tokens"):
        model(images, tokens.astype(jnp.float32))
    with pytest.raises(ValueError, match="max_text_len"):
        model(images, jnp.zeros((2, 9), jnp.int32))
    with pytest.raises(ValueError, match="tokens"):
        model(images, tokens.at[0, 0].set(V))
    with pytest.raises(ValueError, match="image_tokens"):
        model.decode(jnp.zeros((2, 4, 8)), tokens)
    with pytest.raises(ValueError, match="image_mask"):
        model.decode(jnp.ones((2, 4, 16)), tokens, image_mask=jnp.ones((2, 3), bool))
    with pytest.raises(ValueError, match="patch_size"):
        TinyVLM(V, rngs=nnx.Rngs(0), image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="vocab_size"):
        TinyVLM(0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="stem_channels"):
        TinyVLM(V, rngs=nnx.Rngs(0), stem_channels=-1)
    with pytest.raises(ValueError, match="stem_layers"):
        TinyVLM(V, rngs=nnx.Rngs(0), stem_channels=4, stem_layers=0)
    with pytest.raises(ValueError, match="max_len"):
        model.generate(images, bos=1, eos=2, pad=0, max_len=9)

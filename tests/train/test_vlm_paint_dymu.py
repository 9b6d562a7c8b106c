"""train/vlm_paint_dymu.py machinery on a tiny untrained TinyVLM built here (never the trained checkpoint): the
score-mod decoder equals ``model.decode``, PAINT with alpha = beta = 0 is the baseline and reaches only its
layers, the merged encoder with tau = +inf equals ``encode_image``, VTU by expansion equals the compact
log-size-bias decoder, and tiny end-to-end runs of both experiments."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.methods.generative import dymu
from train import vlm_paint_dymu as E
from train.captioning import Vocab, heldout_shapes, make_batch


@pytest.fixture(scope="module")
def tiny():
    from jattn.nn.vlm import TinyVLM
    vocab = Vocab.default()
    model = TinyVLM(len(vocab), rngs=nnx.Rngs(4), image_size=32, patch_size=8, dim=16, encoder_layers=2,
                    decoder_layers=2, num_heads=2, mlp_dim=32, max_text_len=16)
    ex = heldout_shapes(3, seed=1)
    batch = make_batch(ex.images, ex.captions, vocab, 16)
    return model, vocab, ex, batch


def test_custom_decode_equals_decode_and_paint_zero_is_identity(tiny):
    """No mods: the logits and maps of ``model.decode``; PAINT with alpha = beta = 0 gives the same logits; PAINT in
    layer 1 only leaves layer 0's map unchanged and changes layer 1's text rows on image keys only, raising the
    boosted mass (catches a wrong mask/residual in the re-implemented forward, mods applied to every layer, or
    image rows boosted)."""
    model, _, _, batch = tiny
    images, inputs = jnp.asarray(batch["images"]), jnp.asarray(batch["inputs"])
    T = inputs.shape[1]

    @nnx.jit
    def run(model, images, inputs):
        it, local, summary = E.paint_tokens(model, images)
        zero = E.paint_score_mods(local, summary, T, (0, 1), alpha=0.0, beta=0.0)
        mods = E.paint_score_mods(local, summary, T, (1,), alpha=0.7, beta=0.3)
        return (it, local, summary, model.decode(it, inputs, return_probs=True),
                E.custom_decode(model, it, inputs, return_probs=True), E.custom_decode(model, it, inputs),
                E.custom_decode(model, it, inputs, score_mods=zero),
                E.custom_decode(model, it, inputs, score_mods=mods, return_probs=True)[1])

    it, local, summary, (logits, maps), (logits2, maps2), xla, zero, pmaps = run(model, images, inputs)
    np.testing.assert_allclose(np.asarray(logits2), np.asarray(logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(xla), np.asarray(logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(zero), np.asarray(logits), rtol=1e-5, atol=1e-5)
    N = it.shape[1]
    np.testing.assert_allclose(np.asarray(pmaps[0]), np.asarray(maps2[0]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(pmaps[1])[:, :, :N], np.asarray(maps2[1])[:, :, :N], rtol=1e-6, atol=1e-7)
    boosted = np.asarray(local | summary)[:, None, None, :]
    before = (np.asarray(maps2[1])[:, :, N:, :N] * boosted).sum(-1)
    after = (np.asarray(pmaps[1])[:, :, N:, :N] * boosted).sum(-1)
    assert np.all(after >= before - 1e-6) and np.any(after > before + 1e-4)


def test_paint_captioner_zero_equals_baseline(tiny):
    """The PAINT captioner with alpha = beta = 0 writes the baseline captioner's tokens (catches a boost leaking in
    through the captioner's own plumbing)."""
    model, vocab, ex, _ = tiny
    base = E.make_paint_captioner(model, vocab)(ex.images)
    zero = E.make_paint_captioner(model, vocab, layers=(0, 1), alpha=0.0, beta=0.0)(ex.images)
    np.testing.assert_array_equal(zero, base)
    assert base.shape == (3, 16) and np.all(base[:, 0] == vocab.bos)


def test_merged_encoder_tau_inf_and_vtu_forms(tiny):
    """``merged_encode`` with tau = +inf equals ``encode_image`` (64 -> 16 tokens here, none merged); with merging,
    the expanded tokens through ``model.decode`` (VTU) equal the compact tokens with the log-size key bias
    (``custom_decode``), and differ from the merged tokens counted once (catches proportional attention missing
    in the encoder, the bias missing in the decoder, or a wrong expansion)."""
    model, vocab, _, batch = tiny
    images, inputs = jnp.asarray(batch["images"]), jnp.asarray(batch["inputs"])

    @nnx.jit
    def run(model, images, inputs):
        inf = E.merged_encode(model, images, taus=jnp.full((2,), jnp.inf))
        tok, sizes, mapping, used = E.merged_encode(model, images, r=3)
        return (inf, model.encode_image(images), (tok, sizes, mapping, used),
                model.decode(dymu.vtu_expand(tok, mapping), inputs),
                E.custom_decode(model, tok, inputs, image_sizes=sizes),
                model.decode(tok, inputs, image_mask=sizes > 0))

    inf, plain, (tok, sizes, mapping, used), vtu, biased, once = run(model, images, inputs)
    np.testing.assert_allclose(np.asarray(inf[0]), np.asarray(plain), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(inf[1]) == 1)
    kept = np.asarray(dymu.tokens_kept(sizes))
    assert np.all(kept < 16) and kept.sum() == 3 * 16 - 2 * 3 * 3 and used.shape == (2,)
    np.testing.assert_allclose(np.asarray(biased), np.asarray(vtu), rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(once), np.asarray(vtu), atol=1e-4)


def test_dymu_captioner_baseline_and_calibration(tiny):
    """tau = +inf captions equal the plain greedy captions with all 16 tokens kept; calibrated thresholds merge more
    tokens for a larger r; "bias" and "expand" VTU give the same captions (catches the threshold rank or the
    VTU path wrong)."""
    model, vocab, ex, _ = tiny
    plain = model.generate(jnp.asarray(ex.images), bos=vocab.bos, eos=vocab.eos, pad=vocab.pad)
    cap = E.make_dymu_captioner(model, vocab)
    ids, kept = cap(ex.images, np.full(2, np.inf))
    np.testing.assert_array_equal(ids, np.asarray(plain))
    assert np.all(kept == 16)
    t2, t5 = E.calibrate_taus(model, 2, num=8, batch_size=4), E.calibrate_taus(model, 5, num=8, batch_size=4)
    assert t2.shape == (2,) and np.all(t5 <= t2 + 1e-6)
    _, k2 = cap(ex.images, t2)
    ids5, k5 = cap(ex.images, t5)
    assert k5.mean() <= k2.mean() < 16
    ids5b, _ = E.make_dymu_captioner(model, vocab, taus=t5, vtu="bias")(ex.images)
    np.testing.assert_array_equal(ids5b, ids5)


def test_tiny_end_to_end_runs(tiny):
    """Both experiments run on 4 images x 1 set and report every variant (catches a broken summary or pairing)."""
    model, vocab, _, _ = tiny
    p = E.run_paint(model, vocab, num=4, sets=1, variants=())
    assert set(p["summary"]) == {"baseline", "oracle_objects_layers1_a0.7"}
    assert 0.0 <= p["token_counts"]["local_on_object"] <= 1.0
    assert p["summary"]["baseline"]["delta_exact_match"] == [0.0, 0.0]
    d = E.run_dymu(model, vocab, num=4, sets=1, rs=(2,), calib_num=8, batch_size=4, no_vtu=False)
    assert d["summary"]["baseline_tau_inf"]["tokens_kept"][0] == 16
    assert d["summary"]["tome_fixed_r2"]["tokens_kept"][0] == 12
    with pytest.raises(ValueError, match="taus"):
        E.merged_encode(model, jnp.zeros((1, 32, 32, 3)) + 0.5, taus=jnp.zeros(3))
    with pytest.raises(ValueError, match="vtu"):
        E.make_dymu_captioner(model, vocab, taus=np.zeros(2), vtu="x")

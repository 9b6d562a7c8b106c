"""Every built method is reachable by name: ``Attention(method=NAME)`` for every registered name (derived from
the catalogue), each equal to its op-level definition, with documented config and errors that list the
valid names and keys."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn.catalog import PAPERS
from jattn.core.masks import materialize
from jattn.nn import Attention, available_methods, describe_method, get_method
from jattn.nn.methods import REQUIRED
from tests.conftest import assert_close

B, T, DIM, H = 2, 64, 32, 4
GRID = (8, 8)

# A tiny config for every registered name; a new method must add one (test_every_method_has_a_tiny_config).
TINY = {
    "softmax": {}, "sliding_window": {"window": 5}, "sigmoid": {}, "lightning": {},
    "masked": {"mask_fn": jattn.masks.sliding_window_mask(3)},
    "block_sparse": {"mask_fn": jattn.masks.sliding_window_mask(3)},
    "radial": {"frames": 8, "block": 16, "granularity": "token"},
    "s2": {"local_blocks": 1, "vert_stride": 2, "block": 16},
    "moa": {"alphas": (8, 16, 24, 32), "betas": 0.25, "block": 16},
    "naavit": {"prefix": 8, "visual": 24, "block": 16},
    "sinklora_s2": {"group_size": 16, "block": 16},
    "sinklora_sf": {"group_size": 16, "sinks": 2, "block": 16},
    "davit_window": {"grid": GRID, "window_size": 4, "block": 16},
    "clear": {"grid": GRID, "radius": 2.5, "block": 16},
    "neighborhood": {"kernel_size": 3, "grid": GRID},
    "biformer": {"grid": GRID, "regions": 2, "topk": 2},
    "linfusion": {},
    "agent": {"grid": GRID, "num_agents": 4},
    "flexprefill": {"block_size": 16, "min_budget": 16},
    "hip": {"k_budget": 16, "block_q": 16, "block_k": 16, "window": 16},
    "kinetics": {"topk": 1, "block_q": 16, "block_size": 16, "sink": 4},
    "sale": {"block_q": 16, "block_k": 16, "local_window": 16, "dense_len": 0},
    "anchor": {"block_size": 16, "step": 2, "block_q": 16, "block_k": 16},
    "entropy_scaled": {"train_keys": 16},
    "act": {"head_mask": (True, False, True, False)},
}
CAUSAL_ONLY = {"flexprefill", "hip", "kinetics", "sale", "anchor"}
NON_CAUSAL_ONLY = {"biformer", "linfusion", "agent"}


def _x(seed=0):
    return jax.random.normal(jax.random.key(seed), (B, T, DIM))


def _layer(name, causal, num_kv_heads=2, **extra):
    return Attention(DIM, H, num_kv_heads=num_kv_heads, rngs=nnx.Rngs(1), method=name, causal=causal,
                     **{**TINY[name], **extra})


def _through(layer, x, core):
    """The layer with its attention core replaced by ``core(q, k, v)``: projections, core, output projection."""
    q, k, v = layer.project(x, jnp.arange(x.shape[1])[None])
    return layer.finish(x, core(q, k, v))


def library_methods():
    """The registry (tests that register a method of their own unregister it when done)."""
    return set(available_methods())


def test_every_method_has_a_tiny_config():
    assert set(TINY) == library_methods()


def test_registry_is_derived_from_the_catalogue():
    named = {name for p in PAPERS for name in p.layer_methods}
    generic = {"softmax", "sliding_window", "masked", "block_sparse"}
    assert named == library_methods() - generic
    for paper in PAPERS:
        if paper.status == "planned":
            assert not paper.layer_methods and not paper.not_a_layer, paper.id
        else:   # every built paper is a layer by name, or says why it is not one
            assert bool(paper.layer_methods) != bool(paper.not_a_layer), paper.id


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_name_builds_runs_and_documents_its_config(name):
    causal = name not in NON_CAUSAL_ONLY
    layer = _layer(name, causal)
    out = layer(_x())
    assert out.shape == (B, T, DIM) and bool(jnp.all(jnp.isfinite(out)))
    method = get_method(name)
    text = describe_method(name)
    for option in method.options:
        assert option.name in text and option.doc
    required = [o.name for o in method.options if o.default is REQUIRED]
    for key in required:   # leaving out a required key names it
        config = {k: v for k, v in TINY[name].items() if k != key}
        with pytest.raises(TypeError, match=f"needs (config )?'?{key}"):
            Attention(DIM, H, rngs=nnx.Rngs(0), method=name, **config)


def test_unknown_names_and_keys_list_the_valid_ones():
    with pytest.raises(ValueError, match="did you mean 'radial'") as err:
        Attention(DIM, H, rngs=nnx.Rngs(0), method="radal")
    for name in ("radial", "s2", "neighborhood", "softmax"):
        assert repr(name) in str(err.value)
    with pytest.raises(TypeError, match="did you mean 'frames'.*accepts"):
        Attention(DIM, H, rngs=nnx.Rngs(0), method="radial", frams=4)
    with pytest.raises(ValueError, match="block must be a power of two"):
        Attention(DIM, H, rngs=nnx.Rngs(0), method="radial", frames=4, block=24)
    with pytest.raises(ValueError, match="multiple of frames=5"):
        Attention(DIM, H, rngs=nnx.Rngs(0), method="radial", frames=5, block=16)(_x())
    with pytest.raises(ValueError, match="grid=.*holds 36 tokens"):
        Attention(DIM, H, rngs=nnx.Rngs(0), method="clear", grid=(6, 6), radius=2.0)(_x())
    with pytest.raises(ValueError, match="bidirectional"):
        _layer("biformer", True)(_x())


# ------------------------------------------------------------------ equal to the op-level definitions

def _grid(x):
    return x.reshape(x.shape[0], *GRID, *x.shape[2:])


def _flat(x):
    return x.reshape(x.shape[0], T, *x.shape[-2:])


def _ops(name):
    """The method's own op-level function (non-causal unless the method is causal by definition)."""
    from jattn.methods.linear import agent, linfusion
    from jattn.methods.sparse import biformer, clear, davit, moa, radial, s2, saisa, sinklora
    return {
        "radial": lambda q, k, v: radial.radial_attention(q, k, v, num_frames=8, tokens_per_frame=8, block=16,
                                                         granularity="token"),
        "s2": lambda q, k, v: s2.s2_attention(q, k, v, block=16, local_blocks=1, vert_stride=2, causal=False),
        "moa": lambda q, k, v: moa.moa_attention(q, k, v, alphas=(8, 16, 24, 32), betas=0.25, block=16),
        "naavit": lambda q, k, v: saisa.saisa_attention(q, k, v, num_prefix=8, num_visual=24, block_q=16,
                                                        block_k=16),
        "sinklora_s2": lambda q, k, v: sinklora.shifted_sparse_attention(q, k, v, group_size=16, block_q=16,
                                                                         block_k=16),
        "sinklora_sf": lambda q, k, v: sinklora.sf_attention(q, k, v, group_size=16, num_sinks=2, block_q=16,
                                                             block_k=16),
        "davit_window": lambda q, k, v: _flat(davit.window_attention_2d_direct(_grid(q), _grid(k), _grid(v), 4)),
        "clear": lambda q, k, v: clear.clear_attention(q, k, v, GRID, 0, 2.5, block_q=16, block_k=16),
        "neighborhood": lambda q, k, v: _flat(jattn.neighborhood_attention(_grid(q), _grid(k), _grid(v), 3,
                                                                           impl="reference")),
        "biformer": lambda q, k, v: _flat(biformer.bi_level_routing_attention(_grid(q), _grid(k), _grid(v), 2, 2,
                                                                              form="gather")),
        "linfusion": lambda q, k, v: linfusion.generalized_linear_attention(q, k, v),
        "agent": lambda q, k, v: agent.agent_attention(q, k, v, agent.pool_agents(q, GRID, 4)),
    }[name]


def _dense_pattern(name):
    """The method's token mask ``[H or 1, T, T]`` from its own mask functions (not the layer's BlockMask)."""
    from jattn.methods.sparse import clear, davit, moa, radial, s2, saisa, sinklora
    if name == "radial":
        return materialize(radial.radial_mask_fn(8, 8, 0, block=16), 1, 1, T, T)[0]
    if name == "s2":
        return materialize(s2.s2_mask_fn(H, 16, local_blocks=1, vert_stride=2, num_kv_heads=2, causal=True),
                           1, H, T, T)[0]
    if name == "moa":
        return materialize(moa.moa_mask_fn((8, 16, 24, 32), (0.25,) * 4, T, 16), 1, H, T, T)[0]
    if name == "naavit":
        return saisa.naavit_mask(8, 24, T - 32)[None]
    if name == "sinklora_s2":
        return jnp.asarray(sinklora.shifted_sparse_attention_mask(T, H, 16)).reshape(-1, T, T)
    if name == "sinklora_sf":
        return jnp.asarray(sinklora.sf_attention_mask(T, H, 16, 2)).reshape(-1, T, T)
    if name == "davit_window":
        return materialize(davit.window_mask_fn(GRID, 4), 1, 1, T, T)[0]
    if name == "clear":
        return clear.clear_mask(GRID, 0, 2.5)[0]
    if name == "neighborhood":
        return jnp.asarray(jattn.neighborhood_mask(GRID, 3, causal=True))[None]
    raise KeyError(name)


OP_LEVEL = ["radial", "s2", "moa", "naavit", "sinklora_s2", "sinklora_sf", "davit_window", "clear", "neighborhood",
            "biformer", "linfusion", "agent"]
PATTERNS = [n for n in OP_LEVEL if n not in NON_CAUSAL_ONLY]


@pytest.mark.parametrize("name", OP_LEVEL)
def test_layer_equals_the_methods_own_function(name):
    # H == Hkv where the method function has no GQA (agent, linfusion, biformer's gather form)
    layer = _layer(name, causal=(name == "moa"), num_kv_heads=H if name in NON_CAUSAL_ONLY else 2)
    x = _x(1)
    assert_close(layer(x), _through(layer, x, _ops(name)), what=name)


@pytest.mark.parametrize("name", PATTERNS)
def test_causal_layer_is_the_methods_mask_and_causal(name):
    layer = _layer(name, causal=True)
    pattern = jnp.asarray(_dense_pattern(name), bool)
    causal = jnp.tril(jnp.ones((T, T), bool))
    visible = pattern & causal
    assert bool(jnp.any(causal & ~visible)), f"{name}: the test pattern must hide some causal keys"
    x = _x(2)
    want = _through(layer, x, lambda q, k, v: jattn.reference_attention(q, k, v, mask=visible[None]))
    assert_close(layer(x), want, what=name)
    # the padding-mask / probability path (dense) agrees and its maps are the pattern
    out, probs = layer(x, return_probs=True)
    assert_close(out, want, what=f"{name} probs path")
    assert not bool(jnp.any((probs > 0) & ~visible[None]))


def test_pattern_layers_run_under_jit_with_the_fused_path():
    layer = _layer("radial", causal=True)
    x = _x(3)
    want = _through(layer, x, lambda q, k, v: jattn.reference_attention(
        q, k, v, mask=jnp.asarray(_dense_pattern("radial"))[None], causal=True))
    assert_close(nnx.jit(lambda m, x: m(x))(layer, x), want)


def test_pattern_layers_train_in_a_decoder_lm():
    model = jattn.nn.DecoderLM(50, DIM, 1, H, rngs=nnx.Rngs(0), method="s2", method_config=TINY["s2"])
    tokens = jax.random.randint(jax.random.key(4), (B, T), 0, 50)
    grads = nnx.grad(lambda m: jnp.mean(m(tokens) ** 2))(model)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    with pytest.raises(ValueError, match="does not support decoding"):
        model.init_cache(1, T)


def test_cli_overrides_choose_a_pattern_by_name(tmp_path):
    from train.build import build_model, build_task
    from train.config import apply_overrides, check_config, load_config
    config = apply_overrides(load_config("configs/lm_softmax.py"),
                             ["model.method=radial", "model.method_config.frames=8",
                              "model.method_config.block=16", "task.seq_len=64"])
    check_config(config)
    task = build_task(config["task"])
    model = build_model(config["model"], task, 0)
    assert model.blocks[0].attention.method == "radial"
    assert model.blocks[0].attention.method_config["frames"] == 8
    logits = model(jnp.zeros((1, 64), jnp.int32))
    assert logits.shape == (1, 64, 256)
    bad = apply_overrides(config, ["model.method_config.frams=8"])
    with pytest.raises(TypeError, match="did you mean 'frames'"):
        build_model(bad["model"], task, 0)


@pytest.mark.parametrize("name", sorted(CAUSAL_ONLY))
def test_selector_layer_is_its_attention_function_and_refuses_the_rest(name):
    """A dynamic selector layer runs ``jattn.methods.dynamic.<name>_attention`` on the layer's own q, k, v with
    its config (a dropped or renamed option changes the tiles it picks); it is causal prefill only and has no
    probabilities or padding mask, and says so."""
    import jattn.methods.dynamic as dynamic
    layer = _layer(name, causal=True)
    x = _x(3)
    want = _through(layer, x, lambda q, k, v: getattr(dynamic, f"{name}_attention")(q, k, v, **TINY[name]))
    assert_close(layer(x), want, what=name)
    with pytest.raises(ValueError, match="causal prefill"):
        _layer(name, causal=False)(x)
    with pytest.raises(ValueError, match="no attention probabilities"):
        layer(x, return_probs=True)

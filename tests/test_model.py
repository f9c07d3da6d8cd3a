"""Model behaviour: parameter counts of the full-size configs, causality, scan == unroll."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, load_tiny
from flax import nnx

from jaxlm import config, lm, sharding, token_loss
from jaxlm.config import MeshConfig, ModelConfig
from jaxlm.step import build


def test_gpt2_124m_has_gpt2_small_parameter_count():
    cfg = config.load(str(ROOT / "configs/gpt.py:gpt2_124m"), ["mesh.data=8"])
    n = build(cfg, sharding.make_mesh(cfg.mesh)).num_params()  # eval_shape only: no arrays
    # GPT-2 small with its vocabulary padded to 50304 and tied embeddings: 124.5M.
    assert 124_000_000 < n < 124_600_000, n


def test_llama_160m_shape():
    cfg = config.load(str(ROOT / "configs/gpt.py:llama_160m"))
    n = build(cfg, sharding.make_mesh(MeshConfig(data=8))).num_params()
    assert 155_000_000 < n < 165_000_000, n  # 160.1M: untied 32k vocab, GQA, SwiGLU 3328


def _model(**extra):
    cfg = load_tiny(**extra).model
    return lm.Model(cfg, nnx.Rngs(0)), cfg


def _logit_grads(model, cfg, segment_ids):
    """position -> |d logits[0, position] / d input embeddings|, summed over the model dim."""
    t = segment_ids.shape[1]
    ids = jnp.arange(t)[None] % cfg.vocab_size
    lengths = np.unique(np.asarray(segment_ids[0]), return_counts=True)[1]
    positions = jnp.asarray(np.concatenate([np.arange(n) for n in lengths])[None])

    @jax.jit
    def grads(position):
        def logits_at(x):
            h = model.transformer(x, model.attention_mask(segment_ids), positions, causal=True)
            return model.embed.attend(h)[0, position].sum()

        return jnp.abs(jax.grad(logits_at)(model.embed(ids, positions))[0]).sum(-1)

    return grads


LLAMA_STYLE = {
    "model.position": "rope",
    "model.num_kv_heads": 2,
    "model.mlp": "swiglu",
    "model.norm": "rmsnorm",
    "model.use_bias": False,
}


@pytest.mark.parametrize("variant", [{}, LLAMA_STYLE], ids=["gpt2", "llama"])
def test_no_logit_depends_on_a_later_token_or_another_document(variant):
    model, cfg = _model(**variant)
    seg = jnp.asarray([[1] * 12 + [2] * 12 + [3] * 8])
    with jax.set_mesh(sharding.make_mesh(MeshConfig(data=8))):
        grads = _logit_grads(model, cfg, seg)
        for position in (0, 5, 11, 12, 20, 24, 31):
            g = np.asarray(grads(position))
            own = np.asarray(seg[0] == seg[0, position])
            earlier_same_doc = own & (np.arange(32) <= position)
            assert np.all(g[~earlier_same_doc] == 0.0), (position, g)
            assert np.all(g[earlier_same_doc] > 0.0), (position, g)


def test_without_the_document_mask_a_row_is_one_causal_sequence():
    model, cfg = _model(**{"model.document_mask": False})
    seg = jnp.asarray([[1] * 12 + [2] * 12 + [3] * 8])
    with jax.set_mesh(sharding.make_mesh(MeshConfig(data=8))):
        grads = _logit_grads(model, cfg, seg)
        for position in (5, 20, 31):
            g = np.asarray(grads(position))
            earlier = np.arange(32) <= position
            assert np.all(g[~earlier] == 0.0), (position, g)
            assert np.all(g[earlier] > 0.0), (position, g)  # earlier documents too


def test_scan_and_unrolled_layers_agree():
    model, cfg = _model()
    graphdef, params = nnx.split(model)
    unrolled_cfg = load_tiny(**{"model.scan_layers": False}).model
    unrolled = nnx.merge(nnx.graphdef(lm.Model(unrolled_cfg, nnx.Rngs(0))), params)
    batch = {
        "inputs": jnp.arange(64).reshape(2, 32) % cfg.vocab_size,
        "positions": jnp.tile(jnp.arange(32), (2, 1)),
        "segment_ids": jnp.ones((2, 32), jnp.int32),
    }
    with jax.set_mesh(sharding.make_mesh(MeshConfig(data=8))):
        scanned_logits, unrolled_logits = jax.jit(lambda: (model(batch), unrolled(batch)))()
    np.testing.assert_allclose(scanned_logits, unrolled_logits, rtol=1e-5, atol=1e-5)


def test_bert_base_has_bert_base_parameter_count():
    cfg = config.load(str(ROOT / "configs/bert.py:bert_base"), ["mesh.data=8"])
    n = build(cfg, sharding.make_mesh(cfg.mesh)).num_params()
    # BertForMaskedLM-base without the pooler (unused by MLM): 109.5M.
    assert 109_400_000 < n < 109_600_000, n


def test_clip_vit_b16_has_clip_parameter_count():
    cfg = config.load(str(ROOT / "configs/clip.py:vit_b16"), ["mesh.data=8"])
    n = build(cfg, sharding.make_mesh(cfg.mesh)).num_params()
    # OpenAI's CLIP ViT-B/16 has 149.6M parameters (86.2M image tower, 63.2M text tower).
    assert 149_000_000 < n < 150_200_000, n


@pytest.mark.parametrize("rows", [2, 3])
def test_token_types_equal_a_gather_without_a_scatter(rows):
    """layers.token_type_rows (a sum of selects) equals a gather of the table, values and the
    table's gradient, for 2 and 3 types; its gradient is no scatter-add (a gather's is, and
    its atomic adds queue on the few rows on a GPU)."""
    from jaxlm.layers import token_type_rows

    table = jax.random.normal(jax.random.key(rows), (rows, 16))
    types = jax.random.randint(jax.random.key(1), (3, 11), 0, rows)
    dy = jax.random.normal(jax.random.key(2), (3, 11, 16))

    def ours(table):
        return (token_type_rows(table, types) * dy).sum()

    def gather(table):
        return (jnp.take(table, types, axis=0) * dy).sum()

    np.testing.assert_array_equal(token_type_rows(table, types), jnp.take(table, types, axis=0))
    np.testing.assert_allclose(jax.grad(ours)(table), jax.grad(gather)(table), rtol=1e-5)
    assert "scatter" not in str(jax.make_jaxpr(jax.grad(ours))(table))
    assert "scatter" in str(jax.make_jaxpr(jax.grad(gather))(table))  # what it replaces


@pytest.mark.parametrize("vocab", [1152, 1001])  # 9 x 128: one read; odd: jax.nn's two
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_cross_entropy_equals_the_textbook_form(dtype, vocab):
    """token_loss.token_cross_entropy (one-read logsumexp, its own gradient) against autodiff
    of logsumexp - the target's logit: values and gradients, on logits up to +-60 (where an
    unshifted exp overflows float32) and a row of equal logits; the logits' gradient keeps
    their dtype."""
    keys = jax.random.split(jax.random.key(1), 3)
    logits = (jax.random.normal(keys[0], (3, 7, vocab)) * 20).clip(-60, 60)
    logits = logits.at[1, 2].set(4.0).astype(dtype)
    targets = jax.random.randint(keys[1], (3, 7), 0, vocab)
    weights = jax.random.uniform(keys[2], (3, 7))

    def textbook(x):
        x = x.astype(jnp.float32)
        picked = jnp.take_along_axis(x, targets[..., None], -1)[..., 0]
        return ((jax.nn.logsumexp(x, -1) - picked) * weights).sum()

    def fused(x):
        return (token_loss.token_cross_entropy(x, targets) * weights).sum()

    want, want_grad = jax.value_and_grad(textbook)(logits)
    got, got_grad = jax.jit(jax.value_and_grad(fused))(logits)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got_grad.dtype == dtype
    atol = 1e-6 if dtype == jnp.float32 else 8e-3  # bfloat16: its rounding of each gradient
    np.testing.assert_allclose(got_grad.astype(np.float32), want_grad.astype(np.float32), atol=atol)
    flat = token_loss.token_cross_entropy(logits, targets)[1, 2]  # equal logits: log V
    np.testing.assert_allclose(flat, np.log(vocab), rtol=1e-6)


def test_logsumexp_of_empty_and_nan_rows():
    """Rows of -inf give -inf (the combine of two empty parts is not NaN); a NaN stays NaN;
    a row with -inf entries (a padded vocabulary's masked ids) sums the rest."""
    x = jnp.zeros((3, 64)).at[0].set(-jnp.inf).at[1, 5].set(jnp.nan).at[2, ::2].set(-jnp.inf)
    got = token_loss.logsumexp(x)
    assert got[0] == -jnp.inf and jnp.isnan(got[1])
    np.testing.assert_allclose(got[2], np.log(32), rtol=1e-6)


@pytest.mark.parametrize("vocab", [49152, 50257])
def test_logsumexp_is_as_accurate_as_jax_nn(vocab):
    """Against float64, over rows of 49152 (SmolLM2's vocabulary: the one-read form, in 128
    pieces) and 50257 (HF GPT-2's: jax.nn.logsumexp): no bias beyond 3e-7. One sequential
    float32 sum of 49152 terms, as XLA's CPU compiler runs a one-level reduction with its
    own combine, came out low by 5e-5 (and moved an HF perplexity by 2e-4: test_harness)."""
    x = np.random.default_rng(0).standard_normal((32, vocab)).astype(np.float32) * 3
    top = x.max(1, keepdims=True).astype(np.float64)
    exact = np.log(np.exp(x - top).sum(1)) + top[:, 0]
    err = np.asarray(jax.jit(token_loss.logsumexp)(x), np.float64) - exact
    assert abs(err.mean()) < 3e-7 and np.abs(err).max() < 3e-6, (err.mean(), np.abs(err).max())


@pytest.mark.parametrize("chunk", [16, 13, 64])
def test_chunked_cross_entropy_equals_the_plain_one(chunk):
    """Value and gradients (to the hidden states and the projection), with a padded last
    chunk (40 positions in chunks of 16 or 13) and with one chunk."""
    keys = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(keys[0], (3, 40, 16))
    table = jax.random.normal(keys[1], (50, 16))
    targets = jax.random.randint(keys[2], (3, 40), 0, 50)
    weights = (jax.random.uniform(keys[3], (3, 40)) > 0.2).astype(jnp.float32)

    def plain(h, w):
        return lm.cross_entropy(jnp.einsum("BTD,VD->BTV", h, w), targets, weights)[0]

    def chunked(h, w):
        logits = lambda x: jnp.einsum("...D,VD->...V", x, w)  # noqa: E731
        return lm.chunked_cross_entropy(h, logits, targets, weights, chunk)[0]

    want, want_grads = jax.value_and_grad(plain, argnums=(0, 1))(hidden, table)
    got, got_grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, table)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("variant", "low", "high"),
    [("llama_1b", 1.230e9, 1.240e9), ("llama_7b", 6.73e9, 6.75e9), ("llama_70b", 68.9e9, 69.1e9)],
)
def test_llama_shapes(variant, low, high):
    """Llama-3.2-1B 1,235.8M; Llama-2-7B 6,738.4M; Llama-2-70B 68,976.6M (as published)."""
    cfg = config.load(str(ROOT / f"configs/gpt.py:{variant}"), ["mesh.fsdp=8"])
    n = build(cfg, sharding.make_mesh(cfg.mesh)).num_params()
    assert low < n < high, n


def _packed_row() -> dict:
    """One row of 3 documents and a shard's last-row padding: [bos] a b [eos] [bos] c [eos]
    [bos] d e [eos] 0 0."""
    from jaxlm.shards import row_example

    tokens = np.array([[2, 10, 11, 3, 2, 12, 3, 2, 13, 14, 3, 0, 0]], np.int32)
    segments = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 0, 0]], np.int32)
    return row_example(tokens, segments)


def test_document_mask_targets_only_within_a_document():
    """With the document mask, the first token of a packed document is never a target and
    positions restart at each document."""
    ex = lm.to_example(_packed_row(), document_mask=True)
    np.testing.assert_array_equal(ex["targets"][0], [10, 11, 3, 2, 12, 3, 2, 13, 14, 3, 0, 0])
    np.testing.assert_array_equal(ex["weights"][0], [1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(ex["positions"][0], [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 0])


def test_without_the_document_mask_positions_and_targets_run_across_the_row():
    """model.document_mask=false, as GPT-2 and nanoGPT train: positions run 0..T-1 across the
    row and every next token is a target (a document's [bos] too), padding excepted."""
    ex = lm.to_example(_packed_row(), document_mask=False)
    np.testing.assert_array_equal(ex["weights"][0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(ex["positions"][0], np.arange(12))
    cfg = load_tiny(**{"model.document_mask": "false"})
    spec = lm.data_spec(cfg, type("Tok", (), {"bos_id": 2, "eos_id": 3})())
    np.testing.assert_array_equal(spec.transform(_packed_row())["positions"][0], np.arange(12))


def test_activations_are_jaxs_without_erfc():
    """layers.activation: the exact GELU equals jax.nn.gelu's (values and gradients, float32)
    without its erfc, which XLA's GPU compiler expands into two approximations, an exp and
    divisions per element (6.4 ms of ViT-B/16's step on an H200, BENCHMARKS.md); the tanh form
    is jax's; QuickGELU is x * sigmoid(1.702 x), as Hugging Face's quick_gelu."""
    from jaxlm.layers import activation

    x = jnp.linspace(-12.0, 12.0, 100_001)
    exact = jax.nn.gelu(x, approximate=False)
    np.testing.assert_allclose(activation(x, "gelu"), exact, atol=2e-6)
    grad = jax.vmap(jax.grad(lambda v: activation(v, "gelu")))(x)
    want = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
    np.testing.assert_allclose(grad, want, atol=1e-6)
    np.testing.assert_array_equal(activation(x, "gelu_tanh"), jax.nn.gelu(x, approximate=True))
    np.testing.assert_allclose(activation(x, "quick_gelu"), x / (1 + np.exp(-1.702 * x)), atol=1e-6)
    assert np.max(np.abs(activation(x, "quick_gelu") - exact)) > 0.01  # a different function
    primitives = {e.primitive.name for e in jax.make_jaxpr(lambda v: activation(v, "gelu"))(x).eqns}
    assert "erf" in primitives and "erfc" not in primitives, primitives
    with pytest.raises(ValueError, match="activation 'relu': expected gelu, gelu_tanh"):
        activation(x, "relu")


def _one_layer(**fields) -> ModelConfig:
    """A one-layer model of width 16 (MLP 32) over 6 positions, for a layer's own tests."""
    return ModelConfig(vocab_size=8, seq_len=6, num_layers=1, d_model=16, mlp_dim=32, **fields)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_biases_of_k_and_v_folded_equal_adding_them(kv_heads, masked):
    """layers.Attention adds bq to q, leaves bk out (q . bk is the same for every key of a
    row: the softmax ignores it) and adds bv @ wo to the output's bias (each row's weights
    sum to one): outputs and gradients as adding all three to q, k, v, grouped kv heads and
    packed documents included."""
    from jaxlm import attention
    from jaxlm.layers import Attention

    cfg = _one_layer(num_heads=4, num_kv_heads=kv_heads, use_bias=True, position="learned")
    layer = Attention(cfg, nnx.Rngs(0))
    keys = iter(jax.random.split(jax.random.key(3), 8))
    for name in ("bq", "bk", "bv", "bo"):  # biases as a trained model has them, not zeros
        b = getattr(layer, name)
        b[...] = jax.random.normal(next(keys), b.shape)
    x = jax.random.normal(next(keys), (2, 6, 16))
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    segments = jnp.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0]])
    mask = attention.Mask(segment_ids=segments) if masked else attention.Mask()
    real = np.asarray(segments > 0) if masked else np.ones((2, 6), bool)

    def added(p, x):  # the textbook layer: every bias where it is declared
        q = jnp.einsum("BTD,DHK->BTHK", x, p["wq"]) + p["bq"]
        k = jnp.einsum("BSD,DNK->BSNK", x, p["wk"]) + p["bk"]
        v = jnp.einsum("BSD,DNK->BSNK", x, p["wv"]) + p["bv"]
        out = attention.attend(q, k, v, mask, True, "xla")
        return jnp.einsum("BTHK,HKD->BTD", out, p["wo"]) + p["bo"]

    graphdef, state = nnx.split(layer)

    def folded(p, x):
        pure = nnx.to_pure_dict(state) | p
        return nnx.merge(graphdef, pure)(x, mask, positions, True)[0]

    params = {k: getattr(layer, k)[...] for k in ("wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo")}
    weights = jax.random.normal(jax.random.key(4), (2, 6, 16)) * real[..., None]

    def grads(fn):  # of the real rows' outputs, summed with weights, as a loss
        return jax.grad(lambda p, x: (fn(p, x) * weights).sum(), argnums=(0, 1))(params, x)

    want, want_out, got = grads(added), added(params, x), grads(folded)
    got_out = folded(params, x)
    np.testing.assert_allclose(got_out[real], want_out[real], rtol=1e-5, atol=1e-5)
    for name in params:
        np.testing.assert_allclose(got[0][name], want[0][name], rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(got[0]["bk"]) == 0)  # left out: no gradient at all


@pytest.mark.parametrize("kind", ["gelu_tanh", "gelu", "quick_gelu", "swiglu"])
def test_mlp_recomputes_its_nonlinearity_rather_than_saving_it(kind, capsys):
    """layers.Mlp keeps, for its backward pass, the first matmul's output (and the gate's) and
    its activations, not the nonlinearity's intermediates (tanh's output, which XLA's GPU
    compiler wrote to memory in GPT-2's step: BENCHMARKS.md); outputs and gradients as the
    plain computation's."""
    from jaxlm.layers import Mlp, activation

    cfg = _one_layer(num_heads=2, mlp=kind, use_bias=kind != "swiglu")
    mlp = Mlp(cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(mlp)
    params = nnx.to_pure_dict(state)
    keys = iter(jax.random.split(jax.random.key(1), 4))
    for name in ("bi", "bo"):  # biases as a trained model has them, not zeros
        if name in params:
            params[name] = jax.random.normal(next(keys), params[name].shape)
    x = jax.random.normal(next(keys), (2, 6, 16))
    weights = jax.random.normal(next(keys), (2, 6, 16))

    def layer(p, x):
        return (nnx.merge(graphdef, p)(x) * weights).sum()

    def plain(p, x):  # the textbook MLP, every intermediate left to autodiff
        h = x @ p["wi"] + p.get("bi", 0.0)
        h = jax.nn.silu(x @ p["wg"]) * h if kind == "swiglu" else activation(h, kind)
        return ((h @ p["wo"] + p.get("bo", 0.0)) * weights).sum()

    got = jax.jit(jax.value_and_grad(layer, argnums=(0, 1)))(params, x)
    want = jax.jit(jax.value_and_grad(plain, argnums=(0, 1)))(params, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)

    hidden = "f32[2,6,32]"
    jax.ad_checkpoint.print_saved_residuals(plain, params, x)
    textbook = capsys.readouterr().out.count(hidden)
    jax.ad_checkpoint.print_saved_residuals(layer, params, x)
    kept = capsys.readouterr().out
    # h, (the gate,) the activations that the second matmul's weight gradient reads
    assert kept.count(hidden) == (3 if kind == "swiglu" else 2), kept
    assert textbook > kept.count(hidden)  # what autodiff alone would keep

"""The attention chooser against JAX's own cuDNN checks, and the padding it may add."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import attention

CASES = list(
    itertools.product(
        ["gpu", "tpu", "cpu"],  # backend
        ["float32", "bfloat16"],
        [128, 77],  # even and odd lengths (77: CLIP's text)
        [True, False],  # packed documents (a mask) or not
        [64, 128, 256],  # head sizes
        [False, True],  # Hopper or later
    )
)


def test_cudnn_is_only_chosen_where_jax_accepts_the_call(monkeypatch):
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    chosen = 0
    for backend, dtype, length, masked, head, hopper in CASES:
        choice = attention.choose("auto", backend, dtype, head, length, masked, True, hopper)
        assert (choice.implementation == "splash") == (backend == "tpu"), choice
        if choice.implementation != "cudnn":
            assert choice.reason
            continue
        chosen += 1
        assert backend == "gpu", choice
        monkeypatch.setattr(cudnn, "check_compute_capability", lambda c, h=hopper: h)
        monkeypatch.setattr(cudnn, "is_cuda_compute_capability_equal", lambda c: False)
        t = length + choice.pad
        q = jax.ShapeDtypeStruct((2, t, 4, head), jnp.dtype(dtype))
        bias = jax.ShapeDtypeStruct((2, 1, t, t), jnp.dtype(dtype)) if masked else None
        layout = cudnn.AttentionLayout.BTNH
        cudnn.check_layout(q, q, q, bias, None, None, None, None, None, None, layout)
        cudnn.check_is_flash_attention(q, q, q, layout.value, 91000, masked, True)
    # cuDNN is taken wherever it can be: bfloat16 on a GPU with a head size it supports
    # 2 lengths x masked or not x (64 and 128 on both generations, 256 on Hopper only)
    assert chosen == 2 * 2 * 5, chosen
    assert attention.choose("auto", "gpu", "bfloat16", 64, 77, True).pad == 1
    # cuDNN's backward refused odd lengths without a mask too (an H200, JAX 0.11.2)
    assert attention.choose("auto", "gpu", "bfloat16", 64, 77, False).pad == 1
    assert attention.choose("auto", "gpu", "bfloat16", 64, 77, False, training=False).pad == 0
    assert attention.choose("cudnn", "gpu", "float32", 64, 128, True).implementation == "xla"


MASKS = {
    "segments": attention.Mask(
        segment_ids=jnp.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 0, 0]])
    ),
    "lengths": attention.Mask(lengths=jnp.array([7, 5])),
    "none": attention.Mask(),
}


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("causal", [True, False])
def test_padding_to_an_even_length_changes_nothing(monkeypatch, causal, kind):
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (2, 7, 4, 8)) for key in keys)
    mask = MASKS[kind]
    want = attention.attend(q, k, v, mask, causal, "xla")
    padded = attention.Choice("xla", "padded as cuDNN would be", pad=1)
    monkeypatch.setattr(attention, "choose", lambda *a, **k: padded)
    got = attention.attend(q, k, v, mask, causal, "auto")
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_lengths_mask_right_padding_like_segment_ids(causal):
    """CLIP captions pass lengths (cuDNN's own padding mask, no bias): the same outputs at
    every real position, and gradients, as the dense mask of segment ids 1...1 0...0."""
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (2, 6, 4, 8)) for key in keys)
    lengths = jnp.array([6, 4])
    segments = (jnp.arange(6)[None] < lengths[:, None]).astype(jnp.int32)
    real = np.asarray(segments, bool)

    def run(mask):
        _, grads = jax.value_and_grad(
            lambda q, k, v: (
                attention.attend(q, k, v, mask, causal) * segments[..., None, None]
            ).sum(),
            argnums=(0, 1, 2),
        )(q, k, v)
        return attention.attend(q, k, v, mask, causal), grads

    got, got_grads = run(attention.Mask(lengths=lengths))
    want, want_grads = run(attention.Mask(segment_ids=segments))
    np.testing.assert_allclose(got[real], want[real], rtol=1e-6, atol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g[real], w[real], rtol=1e-5, atol=1e-6)
        assert np.all(np.isfinite(g))
    if not causal:  # (causally, no real position could see the padding anyway)
        unmasked = attention.attend(q, k, v, attention.Mask(), causal)
        assert not np.allclose(got[1, :4], unmasked[1, :4])  # the padding really was masked


def test_a_refused_cudnn_call_falls_back_to_xla(monkeypatch, caplog):
    """Where JAX's cuDNN path refuses while tracing (here, on a CPU: "cuDNN is not detected",
    or with JAX's CUDA plugin installed, no CPU lowering of the cuDNN call), the call runs on
    XLA instead and the log says why."""
    keys = jax.random.split(jax.random.key(2), 3)
    q, k, v = (jax.random.normal(key, (2, 8, 4, 64), jnp.bfloat16) for key in keys)
    want = attention.attend(q, k, v, attention.Mask(), True, "xla")
    cudnn = attention.Choice("cudnn", "as if on a GPU")
    monkeypatch.setattr(attention, "choose", lambda *a, **k: cudnn)
    with caplog.at_level("INFO", logger="jaxlm"):
        got = attention.attend(q, k, v, attention.Mask(), True, "auto")
    assert "xla (cuDNN refused the call: " in caplog.text
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_segment_runs_are_cudnn_packed_layout():
    segment_ids = jnp.array(
        [
            [1, 1, 1, 2, 2, 3, 0, 0],  # two documents, a third cut short, padding
            [1, 1, 1, 1, 1, 1, 1, 1],  # one document
            [1, 2, 3, 4, 5, 6, 7, 8],  # more documents than fit
        ]
    )
    lengths, starts, count = attention.segment_runs(segment_ids, 4)
    np.testing.assert_array_equal(lengths, [[3, 2, 1, 2], [8, -1, -1, -1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(starts, [[0, 3, 5, 6, -1], [0, -1, -1, -1, -1], [0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(count, [4, 1, 8])


XLA_ATTENTION = jax.nn.dot_product_attention  # before a test patches it


def _cudnn_packed_as_documented(
    q, k, v, q_seqlen, kv_seqlen, q_offsets, kv_offsets, *, scale, mask_type
):
    """cuDNN's packed layout as JAX documents it (jax.nn's cuDNN function): row b's sequence
    m is positions q_offsets[b, m] .. + q_seqlen[b, m], attending only within itself; -1:
    no sequence. Run here on XLA with a mask built from those arrays alone."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    assert q_seqlen is kv_seqlen or np.array_equal(q_seqlen, kv_seqlen)
    t = q.shape[1]
    pos = jnp.arange(t)
    starts, lengths = q_offsets[:, :-1], q_seqlen
    inside = (
        (pos[None, :, None] >= starts[:, None])
        & (pos[None, :, None] < starts[:, None] + lengths[:, None])
        & (starts[:, None] >= 0)
    )  # B T M: which sequence a position is in
    same = jnp.einsum("btm,bsm->bts", inside.astype(jnp.int32), inside.astype(jnp.int32)) > 0
    causal = mask_type in (cudnn.MaskType.CAUSAL, cudnn.MaskType.PADDING_CAUSAL)
    return XLA_ATTENTION(
        q, k, v, mask=same[:, None], is_causal=causal, scale=scale, implementation="xla"
    )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("most", [5, 3])  # 3: the second row's 5 runs do not fit
def test_cudnn_packed_layout_equals_the_dense_mask(monkeypatch, causal, most):
    """model.max_segments on a Hopper GPU: each document a sequence of cuDNN's packed layout,
    here run through that layout's documented meaning; outputs and gradients equal the dense
    mask's, odd length (padded) and grouped kv heads included. A batch with a row of more
    documents than `most` runs the dense mask (traced both ways, chosen on the device)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (2, 7, 4, 8))
    k, v = (jax.random.normal(key, (2, 7, 2, 8)) for key in keys[1:])
    mask = attention.Mask(segment_ids=jnp.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 2, 3, 3, 0, 0]]))

    def loss(q, k, v):
        return (attention.attend(q, k, v, mask, causal, "auto", most) ** 2).sum()

    want, want_grads = jax.value_and_grad(
        lambda q, k, v: (attention.attend(q, k, v, mask, causal, "xla") ** 2).sum(), (0, 1, 2)
    )(q, k, v)
    ran, dense_calls = [], []  # which ran on the device; the dense calls' implementation

    def packed(q, k, v, **kw):
        jax.debug.callback(lambda: ran.append("packed"))
        return _cudnn_packed_as_documented(q, k, v, **kw)

    def dense(*args, implementation=None, **kw):  # cuDNN's dense mask, on XLA here
        jax.debug.callback(lambda: ran.append("dense"))
        dense_calls.append(implementation)
        return XLA_ATTENTION(*args, implementation="xla", **kw)

    monkeypatch.setattr(cudnn, "dot_product_attention", packed)
    monkeypatch.setattr(jax.nn, "dot_product_attention", dense)
    choice = attention.choose("auto", "gpu", "bfloat16", 8, 7, True, True, True, most)
    assert choice.packed == most and choice.pad == 1
    monkeypatch.setattr(attention, "choose", lambda *a, **kw: choice)
    got, got_grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)
    assert dense_calls == ["cudnn"]  # traced once, in the cond's other branch
    assert set(ran) == ({"packed"} if most == 5 else {"dense"}), ran
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_a_refused_packed_layout_falls_back_to_the_dense_mask(caplog):
    """On a CPU JAX's cuDNN functions refuse (as above): the packed layout's refusal is
    logged and the dense mask tried next, then XLA."""
    keys = jax.random.split(jax.random.key(4), 3)
    # (a shape of its own: each message is logged once per shape)
    q, k, v = (jax.random.normal(key, (2, 8, 2, 64), jnp.bfloat16) for key in keys)
    mask = attention.Mask(segment_ids=jnp.array([[1] * 4 + [2] * 4, [1] * 8]))
    want = attention.attend(q, k, v, mask, True, "xla")
    choice = attention.Choice("cudnn", "as if on a Hopper GPU", packed=4)
    with pytest.MonkeyPatch.context() as m, caplog.at_level("INFO", logger="jaxlm"):
        m.setattr(attention, "choose", lambda *a, **kw: choice)
        got = attention.attend(q, k, v, mask, True, "auto", 4)
    assert "cudnn (cuDNN refused the call: " in caplog.text
    assert "xla (cuDNN refused the call: " in caplog.text
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_a_jax_without_the_packed_layout_falls_back_to_the_dense_mask(monkeypatch, caplog):
    """The packed layout calls a private JAX function: a JAX version whose function takes
    other arguments (TypeError) or lacks it is a refusal, logged, not a crash."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    def older(query, key, value, bias=None, mask=None, *, scale=1.0):  # no offsets, lengths
        raise AssertionError("called with arguments it does not take")

    monkeypatch.setattr(cudnn, "dot_product_attention", older)
    keys = jax.random.split(jax.random.key(5), 3)
    q, k, v = (jax.random.normal(key, (2, 8, 2, 32), jnp.bfloat16) for key in keys)
    mask = attention.Mask(segment_ids=jnp.array([[1] * 4 + [2] * 4, [1] * 8]))
    want = attention.attend(q, k, v, mask, True, "xla")
    choice = attention.Choice("cudnn", "as if on a Hopper GPU", packed=4)
    monkeypatch.setattr(attention, "choose", lambda *a, **kw: choice)
    with caplog.at_level("INFO", logger="jaxlm"):
        got = attention.attend(q, k, v, mask, True, "auto", 4)
    assert "cudnn (cuDNN refused the call: " in caplog.text
    assert "unexpected keyword argument" in caplog.text
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_benchmark_batches_pack_several_documents_a_row():
    """`jaxlm bench` times the document mask on rows as a corpus packs them (what cuDNN's
    packed layout costs depends on it), not one document a row."""
    from jaxlm import config, lm, shards

    segments = shards.synthetic_segments(64, 1025, np.random.default_rng(0))
    steps = np.diff(segments, axis=1)
    assert set(np.unique(steps)) == {0, 1}  # one document after another, ids from 1
    assert np.all(segments[:, 0] == 1)
    assert 3 < (steps.sum(axis=1) + 1).mean() < 8  # about 1025 / 256 + 1 a row
    cfg = config.load("configs/gpt.py:tiny")
    batch = lm.synthetic_batch(cfg, 4, np.random.default_rng(0))
    starts = np.flatnonzero(np.diff(batch["segment_ids"][0]) != 0) + 1
    assert len(starts) and np.all(batch["positions"][0][starts] == 0)  # positions restart
    assert np.all(batch["weights"][0][starts - 1] == 0)  # no target across documents


@pytest.mark.parametrize("causal", [True, False])
def test_the_packed_layout_lowers_to_cudnns_packed_kernels(h200_cudnn, monkeypatch, causal):
    """JAX's own cuDNN functions take jaxlm's starts and lengths: the step lowers for CUDA here
    (no GPU needed to lower), forward and backward, to cuDNN's packed kernels (lengths and
    offsets operands, at most `most` documents a row) beside the dense mask's (a bias)."""
    import re

    choice = attention.choose("auto", "gpu", "bfloat16", 64, 15, True, True, True, 4)
    monkeypatch.setattr(attention, "choose", lambda *a, **kw: choice)
    q = jnp.zeros((2, 15, 4, 64), jnp.bfloat16)
    segment_ids = jnp.array([[1] * 5 + [2] * 10, [1] * 12 + [0] * 3])
    mask = attention.Mask(segment_ids=segment_ids)

    def loss(q, k, v):
        return attention.attend(q, k, v, mask, causal, "auto", 4).astype(jnp.float32).sum()

    step = jax.jit(jax.grad(loss, (0, 1, 2)))
    text = step.trace(q, q, q).lower(lowering_platforms=("cuda",)).as_text()
    calls = re.findall(r"custom_call @__cudnn\$(\w+)\(", text)
    configs = re.findall(r"mask_type\\22: \\22(\w+)\\22.*?max_seg_per_batch\\22: (\d+)", text)
    packed = "PADDING_CAUSAL" if causal else "PADDING"
    assert sorted(calls) == [
        "fmhaScaleBiasSoftmax",  # the dense mask: a bias (rows with more documents)
        "fmhaScaleBiasSoftmaxBackward",
        "fmhaSoftmax",  # the packed layout: no bias
        "fmhaSoftmaxBackward",
    ]
    assert sorted(configs) == sorted(2 * [(packed, "4"), ("CAUSAL" if causal else "NO_MASK", "1")])
    assert "tensor<2x4xi32>" in text and "tensor<2x5xi32>" in text  # lengths, starts


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("causal", [True, False])
def test_a_stack_padded_once_equals_the_unpadded_stack(monkeypatch, causal, kind):
    """Where cuDNN would pad an odd length, jaxlm's Transformer pads the whole stack once (the
    layers then see an even length and pad nothing): outputs and gradients as unpadded."""
    from flax import nnx

    from jaxlm import sharding
    from jaxlm.config import MeshConfig, ModelConfig
    from jaxlm.layers import Transformer

    cfg = ModelConfig(vocab_size=8, seq_len=7, num_layers=2, d_model=32, num_heads=4, mlp_dim=64)
    stack = Transformer(cfg, nnx.Rngs(0))  # layers scanned: each traced once a call
    mesh = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
    x = jax.random.normal(jax.random.key(2), (2, 7, 32))
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    mask = MASKS[kind]
    real = np.ones((2, 7), bool) if mask.lengths is None else np.arange(7) < mask.lengths[:, None]

    def run():
        def loss(x):
            return (stack(x, mask, positions, causal) * real[..., None]).sum()

        with jax.set_mesh(mesh):
            return jax.jit(lambda x: (stack(x, mask, positions, causal), jax.grad(loss)(x)))(x)

    want, want_grad = run()
    seen = []

    def even(*args, **kwargs):  # as cuDNN's rule: odd lengths padded by one
        seen.append(args[4])
        return attention.Choice("xla", "padded as cuDNN would be", pad=args[4] % 2)

    monkeypatch.setattr(attention, "choose", even)
    got, got_grad = run()
    assert seen == [7, 8, 7, 8]  # for each call, the stack, then its layer at the even length
    assert got.shape == want.shape
    np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_grad[real], want_grad[real], rtol=1e-5, atol=1e-5)

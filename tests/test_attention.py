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
    """Where JAX's cuDNN path refuses while tracing (here: no cuDNN at all, on CPU), the call
    runs on XLA instead and the log says why."""
    keys = jax.random.split(jax.random.key(2), 3)
    q, k, v = (jax.random.normal(key, (2, 8, 4, 64), jnp.bfloat16) for key in keys)
    want = attention.attend(q, k, v, attention.Mask(), True, "xla")
    cudnn = attention.Choice("cudnn", "as if on a GPU")
    monkeypatch.setattr(attention, "choose", lambda *a, **k: cudnn)
    with caplog.at_level("INFO", logger="jaxlm"):
        got = attention.attend(q, k, v, attention.Mask(), True, "auto")
    assert "xla (cuDNN refused the call: cuDNN is not detected" in caplog.text
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))

"""Pallas splash attention (the TPU kernel) in interpret mode against XLA's attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import attention, sharding
from jaxlm.config import MeshConfig

# two rows of packed documents; 200 positions, padded to 256 inside the kernel
SEGMENTS = np.concatenate(
    [
        np.repeat([[1, 2, 3, 4]], [60, 70, 50, 20], axis=1),
        np.repeat([[1, 2, 0]], [90, 100, 10], axis=1),
    ]
)


def _qkv(heads: int, kv_heads: int, length: int = 200):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (2, length, heads, 16))
    k, v = (jax.random.normal(key, (2, length, kv_heads, 16)) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], q.shape)
    return q, k, v, cotangent


def _value_and_grads(setting, mask, causal, q, k, v, cotangent):
    def loss(q, k, v):
        return (attention.attend(q, k, v, mask, causal, setting) * cotangent).sum()

    out = attention.attend(q, k, v, mask, causal, setting)
    return out, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _close(got, want):
    """rtol 1e-5 where values are not near zero; an atol of 1e-5 of the scale for those."""
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize(
    "mask",
    [
        attention.Mask(segment_ids=jnp.asarray(SEGMENTS)),
        attention.Mask(lengths=jnp.array([200, 190])),
    ],
    ids=["packed", "lengths"],
)
def test_splash_equals_xla_forward_and_gradients(causal, mask):
    q, k, v, cotangent = _qkv(heads=4, kv_heads=2)  # grouped-query
    real = SEGMENTS > 0  # padding's outputs feed no loss (and XLA zeroes them with lengths)
    cotangent = cotangent * real[..., None, None]
    got = _value_and_grads("splash", mask, causal, q, k, v, cotangent)
    want = _value_and_grads("xla", mask, causal, q, k, v, cotangent)
    _close(np.asarray(got[0])[real], np.asarray(want[0])[real])
    for g, w in zip(got[1], want[1], strict=True):
        _close(np.asarray(g), np.asarray(w))


def test_splash_under_shard_map_on_a_mesh_equals_xla():
    """Batch over data x fsdp, heads over tensor: each device runs the kernel on its shard."""
    q, k, v, cotangent = _qkv(heads=4, kv_heads=4, length=128)
    mask = attention.Mask(segment_ids=jnp.asarray(SEGMENTS[:, :128]))
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with jax.set_mesh(mesh):
        got = jax.jit(lambda *a: _value_and_grads("splash", mask, True, *a))(q, k, v, cotangent)
        text = (
            jax.jit(lambda *a: attention.attend(*a, mask, True, "splash")).lower(q, k, v).as_text()
        )
    want = _value_and_grads("xla", mask, True, q, k, v, cotangent)
    assert "shard_map" in text or "sdy.manual_computation" in text
    _close(np.asarray(got[0]), np.asarray(want[0]))
    for g, w in zip(got[1], want[1], strict=True):
        _close(np.asarray(g), np.asarray(w))


def test_a_train_step_with_splash_attention_compiles_for_a_v5e_topology(caplog, libtpu_alone):
    """Ahead of time, for 4 v5e chips (libtpu from PyPI, no TPU): the attention chosen for
    the TPU is splash, run under shard_map, and the compiled step holds the Pallas kernel."""
    from conftest import load_tiny

    from jaxlm import plan

    assert plan.libtpu_installed(), "libtpu missing: the test extra installs it"
    cfg = load_tiny(**{"model.dtype": "bfloat16", "mesh.data": 2, "mesh.tensor": 2})
    with caplog.at_level("INFO", logger="jaxlm"):
        _, compiled = plan.compile_train_step(cfg, plan._tpu_devices("v5e", 4))
    assert "bfloat16: splash (Pallas splash attention with segment ids)" in caplog.text
    assert compiled.as_text().count("tpu_custom_call") >= 3  # forward, dq and dkv kernels

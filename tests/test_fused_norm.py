"""model.norm_kernel=pallas: the fused Pallas Triton norms (jaxlm/fused_norm.py) against XLA's,
run here in Pallas interpret mode; and their compile for an H200 (Triton to PTX, no GPU)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_tiny

from jaxlm import fused_norm, plan, sharding
from jaxlm.step import build, make_train_step


def _reference(x, scale, bias, eps, center):
    y = x.astype(jnp.float32)
    if center:
        y = y - y.mean(-1, keepdims=True)
    y = y * jax.lax.rsqrt((y * y).mean(-1, keepdims=True) + eps) * scale
    return (y if bias is None else y + bias).astype(x.dtype)


@pytest.mark.parametrize("center, with_bias", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("shape", [(3, 7, 48), (21, 100)])  # rows past a block, d not 2^k
def test_fused_norm_equals_the_textbook_norm(shape, center, with_bias):
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], shape) * 2 + 0.5
    scale = jax.random.normal(keys[1], shape[-1:])
    bias = jax.random.normal(keys[2], shape[-1:]) if with_bias else None
    weights = jax.random.normal(keys[3], shape)

    def loss(fn):
        return lambda x, scale, bias: (fn(x, scale, bias) * weights).sum()

    fused = lambda x, s, b: fused_norm.norm(x, s, b, 1e-5, center, True)  # noqa: E731
    textbook = lambda x, s, b: _reference(x, s, b, 1e-5, center)  # noqa: E731
    np.testing.assert_allclose(fused(x, scale, bias), textbook(x, scale, bias), atol=5e-6)
    got = jax.grad(loss(fused), argnums=(0, 1, 2))(x, scale, bias)
    want = jax.grad(loss(textbook), argnums=(0, 1, 2))(x, scale, bias)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-5)


def _first_step(objective: str, **overrides) -> dict:
    cfg = load_tiny(objective, **overrides)
    mesh = sharding.make_mesh(cfg.mesh)
    s = build(cfg, mesh)
    with jax.set_mesh(mesh):
        rng = np.random.default_rng(0)
        batch = s.objective.synthetic_batch(cfg, cfg.train.batch_size, rng)
        state, metrics = make_train_step(s)(s.init(), sharding.to_global(batch, mesh))
        return {k: float(v) for k, v in metrics.items() if k in ("loss", "grad_norm")}


@pytest.mark.parametrize(
    "objective, overrides",
    [
        ("gpt", {}),  # pre-norm LayerNorm with biases
        ("gpt", {"model.norm": "rmsnorm", "model.use_bias": False}),  # Llama's RMSNorm
        ("bert", {}),  # post-norm, the embeddings' norm, the prediction head's
        ("clip", {}),  # both towers
    ],
    ids=["gpt2", "llama", "bert", "clip"],
)
def test_a_training_step_with_pallas_norms_equals_xlas(objective, overrides, monkeypatch):
    """One step on 8 devices (rows split by shard_map): the loss, and the gradients' norm,
    which every norm's backward feeds; the fused norm traced for every kind of norm."""
    from jaxlm import layers

    traced = []
    fused = fused_norm.norm
    monkeypatch.setattr(layers.fused_norm, "norm", lambda *a: traced.append(a) or fused(*a))
    want = _first_step(objective, **overrides)
    assert not traced
    got = _first_step(objective, **overrides, **{"model.norm_kernel": "pallas"})
    assert traced and all(isinstance(a[0], jax.core.Tracer) for a in traced)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)


def test_pallas_norms_compile_to_triton_kernels_for_an_h200(h200):
    """The GPT-2 step with model.norm_kernel=pallas, compiled for an H200 here: every norm is
    a Triton kernel (XLA turns Pallas' Triton into PTX without a GPU); none is left to XLA."""
    from conftest import ROOT

    from jaxlm import config

    overrides = ["model.num_layers=2", "model.norm_kernel=pallas"]
    cfg = config.load(str(ROOT / "configs/gpt.py:gpt2_124m"), overrides)
    _, compiled = plan.compile_train_step(cfg, h200)
    text = compiled.as_text()
    triton = re.findall(r'custom_call_target="__gpu\$xla\.gpu\.triton"', text)
    assert len(triton) == 2 * 5, len(triton)  # 2 norms a layer and the final one, fwd + bwd
    assert "jvp(norm)/reduce" not in text and "transpose(jvp(norm))/mul" not in text

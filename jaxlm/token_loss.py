"""Cross-entropy over a vocabulary, per position: training's loss (lm.cross_entropy, which the
masked LM uses too) and evaluation's log-probabilities (loglik), one function for both.

The logits are the largest tensor of a language model's step ([B, T, V]: GPT-2 124M's batch,
1.24 GB of bfloat16), so how often they are read matters: here the forward reads them once
and the backward once (BENCHMARKS.md, compiled for an H200).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

LANES = 128  # the most pieces logsumexp splits a row into
MIN_PARTS = 32  # fewer: jax.nn.logsumexp (logsumexp's docstring)


def _online_combine(a: tuple, b: tuple) -> tuple:
    """Merge two partial (max, sum of exp(x - max)) pairs of a row into one: one exp, on the
    smaller max's side. Equal maxes (-inf with -inf too: an empty part) add their sums."""
    (m1, s1), (m2, s2) = a, b
    gap = jnp.exp(jnp.where(m1 == m2, 0.0, -jnp.abs(m1 - m2)))
    return jnp.maximum(m1, m2), jnp.where(m1 >= m2, s1 + s2 * gap, s2 + s1 * gap)


def logsumexp(x: jax.Array) -> jax.Array:
    """log(sum(exp(x))) over the last axis, in float32, from one read of x: a single
    (max, sum) reduction, where jax.nn.logsumexp reads x twice (a max, then a sum).

    In two levels: each row as `parts` equal contiguous pieces (the most of LANES that
    divide it), reduced apart, then their pairs. XLA's CPU compiler runs a reduction with
    its own combine as one sequential loop a row, and a float32 sum of 49152 terms in one
    accumulator comes out low by about 5e-5 (1e-7 in 128 pieces; jax.nn.logsumexp's
    vectorized sum 2e-8). A row that splits into fewer than MIN_PARTS pieces (an odd size,
    as Hugging Face GPT-2's 50257) takes jax.nn.logsumexp's two reads instead. Pieces are
    whole divisors of a vocabulary split over `tensor` devices: each stays on its device."""
    x = x.astype(jnp.float32)
    parts = math.gcd(x.shape[-1], LANES)
    if parts < MIN_PARTS:
        return jax.nn.logsumexp(x, axis=-1)
    x = x.reshape(*x.shape[:-1], parts, x.shape[-1] // parts)
    init = (jnp.float32(-jnp.inf), jnp.float32(0.0))
    pairs = jax.lax.reduce((x, jnp.ones_like(x)), init, _online_combine, (x.ndim - 1,))
    top, total = jax.lax.reduce(pairs, init, _online_combine, (x.ndim - 2,))
    return top + jnp.log(total)


@jax.custom_vjp
def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per position, in float32: logits [..., V], targets [...].

    Why a gradient of its own: the forward reads the logits once (`logsumexp`; the target's
    logit by a gather of B*T values) and the backward is one elementwise pass, (softmax -
    onehot) * g, written in the logits' dtype. Autodiff of the textbook form reads them three
    times (a max, a sum, and a pass that both writes the gradient and sums the target's
    logit) or, with a gather, scatters into a float32 copy (BENCHMARKS.md, H200). Logits of
    -inf (a padded vocabulary's ids, masked) add nothing; a NaN logit makes the row NaN."""
    return _token_cross_entropy_fwd(logits, targets)[0]


def _token_cross_entropy_fwd(logits: jax.Array, targets: jax.Array) -> tuple:
    logz = logsumexp(logits)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return logz - picked.astype(jnp.float32), (logits, targets, logz)


def _token_cross_entropy_bwd(residuals: tuple, g: jax.Array) -> tuple:
    logits, targets, logz = residuals
    hit = targets[..., None] == jnp.arange(logits.shape[-1], dtype=targets.dtype)
    softmax = jnp.exp(logits.astype(jnp.float32) - logz[..., None])
    grad = ((softmax - hit) * g[..., None]).astype(logits.dtype)
    return grad, np.zeros(targets.shape, jax.dtypes.float0)


token_cross_entropy.defvjp(_token_cross_entropy_fwd, _token_cross_entropy_bwd)

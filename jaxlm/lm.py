"""Causal language modelling (GPT / Llama style): model, host-side batch transform, loss.

Every objective module exports the same surface: `Model(cfg, rngs)`, `to_example` (the Grain
transform from a packed row to model inputs), `loss_fn(model, batch, rng) -> (loss, metrics)`
and `flops_per_token(cfg)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.layers import Embed, Transformer, param


class Model(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.embed = Embed(cfg, rngs)
        self.transformer = Transformer(cfg, rngs)
        shape, untied = (cfg.d_model, cfg.vocab_size), not cfg.tie_embeddings
        self.head = nnx.data(
            param(rngs, shape, ("embed", "vocab"), cfg.init_std) if untied else None
        )

    def __call__(self, batch: dict) -> jax.Array:
        x = self.embed(batch["inputs"], batch["positions"])
        x = self.transformer(x, batch["segment_ids"], batch["positions"], causal=True)
        if self.head is None:
            return self.embed.attend(x)
        return jnp.einsum("BTD,DV->BTV", x, self.head[...].astype(x.dtype))


def to_example(row: dict) -> dict:
    """A packed row of seq_len + 1 tokens -> next-token inputs, targets and loss weights.

    A target counts only when it continues the same document: the first token of the next
    packed document is never predicted from the previous one.
    """
    tokens, seg, pos = row["tokens"], row["tokens_segment_ids"], row["tokens_positions"]
    weights = (seg[:-1] == seg[1:]) & (seg[:-1] != 0)
    return {
        "inputs": tokens[:-1].astype(np.int32),
        "targets": tokens[1:].astype(np.int32),
        "weights": weights.astype(np.float32),
        "segment_ids": seg[:-1].astype(np.int32),
        "positions": pos[:-1].astype(np.int32),
    }


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    """Weighted mean next-token cross-entropy, computed in float32; also returns the weight."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    total = jnp.maximum(weights.sum(), 1.0)
    return ((logz - picked) * weights).sum() / total, total


def loss_fn(model: Model, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    del rng  # no dropout
    logits = model(batch)
    loss, tokens = cross_entropy(logits, batch["targets"], batch["weights"])
    return loss, {"loss": loss, "tokens": tokens}


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token: 6 x matmul parameters + 12 x L x T x (H x K) for attention
    scores and values (PaLM's count, causal masking not discounted)."""
    d, f, h, n, k = cfg.d_model, cfg.mlp_dim, cfg.num_heads, cfg.kv_heads, cfg.head_size
    attn = d * k * (2 * h + 2 * n)
    mlp = d * f * (3 if cfg.mlp == "swiglu" else 2)
    matmul_params = cfg.num_layers * (attn + mlp) + d * cfg.vocab_size
    return 6.0 * matmul_params + 12.0 * cfg.num_layers * cfg.seq_len * h * k

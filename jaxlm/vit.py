"""The ViT image tower: patch embedding as a matmul + learned positions + the shared stack.

Einsum letters as in layers.py, plus N patches and P pixels per patch (patch^2 x channels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.attention import Mask
from jaxlm.config import Config, ModelConfig
from jaxlm.images import OFFSET, SCALE
from jaxlm.layers import Transformer, param


def tower_config(cfg: Config) -> ModelConfig:
    """The shared stack's settings for the image tower: pre-norm, bidirectional."""
    v, m = cfg.vision, cfg.model
    tokens = (v.image_size // v.patch_size) ** 2 + (v.pool == "cls")
    return ModelConfig(
        vocab_size=1,
        seq_len=tokens,
        num_layers=v.num_layers,
        d_model=v.d_model,
        num_heads=v.num_heads,
        mlp_dim=v.mlp_dim,
        norm="layernorm",
        mlp=v.mlp,
        position="learned",
        dtype=m.dtype,
        scan_layers=m.scan_layers,
        remat=m.remat,
        attention=m.attention,
        norm_kernel=m.norm_kernel,
        init_std=m.init_std,
    )


@jax.custom_vjp
def add_positions(x: jax.Array, table: jax.Array) -> jax.Array:
    """x [B, T, D] + table [T, D], whose gradient, the sum over B, is a matmul (with ones
    [B, 8]: a matrix, which XLA does not rewrite into a reduction as it does a vector). As a
    reduction, XLA's GPU compiler lays the whole backward residual stream out batch-minor
    ([T, D, B]) to sum it: 147 transposes in ViT-B/16's step compiled for an H200,
    `input_transpose_fusion` and its kin 13.2 of 103 ms in a traced step (BENCHMARKS.md,
    2026-12-04)."""
    return x + table.astype(x.dtype)


def _add_positions_fwd(x: jax.Array, table: jax.Array):
    return add_positions(x, table), table  # a parameter, alive anyway: for its dtype


def _add_positions_bwd(table: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    b, t, d = g.shape
    ones = jax.lax.optimization_barrier(jnp.ones((b, 8), g.dtype))  # not a constant to fold
    summed = jnp.einsum("BN,BE->NE", g.reshape(b, t * d), ones, preferred_element_type=table.dtype)
    return g, summed[:, 0].reshape(t, d)


add_positions.defvjp(_add_positions_fwd, _add_positions_bwd)


class ImageTower(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        v, tc = cfg.vision, tower_config(cfg)
        self.patch, self.pool, self.dtype = v.patch_size, v.pool, jnp.dtype(tc.dtype)
        pixels = v.patch_size**2 * v.channels
        self.patch_embed = param(rngs, (pixels, v.d_model), (None, "embed"), tc.init_std)
        self.patch_bias = param(rngs, (v.d_model,), ("norm",), "zeros")
        has_cls = v.pool == "cls"
        self.cls = nnx.data(param(rngs, (v.d_model,), ("norm",), tc.init_std) if has_cls else None)
        self.positions = param(rngs, (tc.seq_len, v.d_model), ("table", "embed"), tc.init_std)
        self.transformer = Transformer(tc, rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        """[B, H, W, C] uint8 images -> pooled features [B, D]. CLIP's normalisation runs
        here, on the device, so the host pipeline ships a quarter of the bytes and does a
        quarter less work per image."""
        b, h, w, c = images.shape
        p = self.patch
        with jax.named_scope("embed"):  # normalisation, patches, their embedding, positions
            images = images.astype(jnp.float32) * SCALE[:c] + OFFSET[:c]
            x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
            x = x.reshape(b, (h // p) * (w // p), p * p * c).astype(self.dtype)
            x = jnp.einsum("BNP,PD->BND", x, self.patch_embed[...].astype(self.dtype))
            x = x + self.patch_bias[...].astype(self.dtype)
            if self.cls is not None:
                cls = jnp.broadcast_to(self.cls[...].astype(self.dtype), (b, 1, x.shape[-1]))
                x = jnp.concatenate([cls, x], axis=1)
            x = add_positions(x, self.positions[...])
        t = x.shape[1]
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        x = self.transformer(x, Mask(), positions, causal=False)  # every patch sees every other
        return x[:, 0] if self.cls is not None else x.mean(axis=1)

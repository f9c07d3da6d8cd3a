"""Pallas splash attention, the TPU kernel MaxText runs, under shard_map over the mesh.

Splash attention never holds [B, H, T, S] scores: it walks 128-position blocks (up to 512) and
skips those its mask rules out (above the diagonal when causal, other documents through the
segment ids). It takes one example's heads at a time, so it is vmapped over the batch, and
it is a Pallas kernel, which XLA's partitioner cannot split, so each device runs it on its
own shard (batch over data and fsdp, heads over tensor) inside shard_map. Lengths are padded
to the block size; the pad is a segment of its own, which no real position sees.
On a CPU it runs in Pallas interpret mode (slow; for tests).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from jaxlm import sharding

BLOCK = 128  # the kernel's smallest block; lengths are padded to a multiple of it


def block_size(length: int) -> int:
    """The largest of 512, 256, 128 that divides `length` (a multiple of BLOCK)."""
    return next(b for b in (512, 256, BLOCK) if length % b == 0)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None,
    causal: bool,
    interpret: bool = False,
) -> jax.Array:
    """q [B, T, H, K], k and v [B, T, N, K] (N divides H; self-attention), segment_ids [B, T]
    or None -> [B, T, H, K], as jax.nn.dot_product_attention would give."""
    b, t, h, size = q.shape
    if k.shape[2] != h:  # grouped-query: each key / value head serves h / n query heads
        k, v = (jnp.repeat(x, h // k.shape[2], axis=2) for x in (k, v))
    q = q * jnp.asarray(1 / math.sqrt(size), q.dtype)  # the kernel does not scale
    pad = -t % BLOCK
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        real = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
        segment_ids = jnp.pad(real, ((0, 0), (0, pad)), constant_values=jnp.max(real) + 1)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # the kernel's [heads, seq, dim]
    length = t + pad

    def local(q, k, v, segment_ids):
        heads = q.shape[1]
        one = sa.CausalMask((length, length)) if causal else sa.FullMask((length, length))
        block = block_size(length)
        kernel = sa.make_splash_mha(
            sa.MultiHeadMask([one] * heads),
            block_sizes=sa.BlockSizes(
                block_q=block,
                block_kv=block,
                block_q_dkv=block,
                block_kv_dkv=block,
                block_q_dq=block,
                block_kv_dq=block,
            ),
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
        )
        if segment_ids is None:
            return jax.vmap(kernel)(q, k, v)
        ids = sa.SegmentIds(q=segment_ids, kv=segment_ids)
        return jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=ids))(q, k, v, ids)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        out = local(q, k, v, segment_ids)
    else:
        heads = sharding.logical_spec(("batch", "heads", None, None), q.shape, mesh)
        rows = sharding.logical_spec(("batch", None), (b, length), mesh)
        out = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(heads, heads, heads, None if segment_ids is None else rows),
            out_specs=heads,
            check_vma=False,
        )(q, k, v, segment_ids)
    return out.transpose(0, 2, 1, 3)[:, :t]

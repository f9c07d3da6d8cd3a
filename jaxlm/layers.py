"""The transformer stack shared by every objective: embeddings, norms, attention, MLP, blocks.

Einsum legend: B batch, T query time, S key time, D embed, H heads, N kv heads, K head dim,
F mlp, V vocab, L layers.

Flax NNX modules here are parameter containers; each parameter carries logical axis names in
its `axes` metadata, which `sharding.RULES` turns into a device layout. Compute runs in
`cfg.dtype` (bfloat16 by default) with float32 parameters cast at use.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import attention, fused_norm
from jaxlm.config import ModelConfig
from jaxlm.sharding import constrain

log = logging.getLogger("jaxlm")
LAYERS = "layers"  # the logical name of the stacked-layer dimension
EMBED = "embed"  # the model width: every weight matrix has it (see optim.decay_mask)


def param(rngs: nnx.Rngs, shape: tuple, axes: tuple, std: float | str) -> nnx.Param:
    """A float32 parameter with logical axis names; std is a float or "zeros"/"ones"."""
    if std == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    elif std == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = std * jax.random.truncated_normal(rngs.params(), -3.0, 3.0, shape, jnp.float32)
    return nnx.Param(value, axes=axes, eager_sharding=False)


def stack_flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token of the transformer stack: 6 x its matmul parameters, plus
    12 x L x T x (H x K) for attention scores and values (PaLM's count, causal masking not
    discounted). Embeddings and heads are the objective's to add."""
    d, f, h, k = cfg.d_model, cfg.mlp_dim, cfg.num_heads, cfg.head_size
    attn = d * k * (2 * h + 2 * cfg.kv_heads)
    mlp = d * f * (3 if cfg.mlp == "swiglu" else 2)
    return 6.0 * cfg.num_layers * (attn + mlp) + 12.0 * cfg.num_layers * cfg.seq_len * h * k


class Norm(nnx.Module):
    """LayerNorm or RMSNorm, computed in float32."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.kind, self.eps, self.kernel = cfg.norm, cfg.norm_eps, cfg.norm_kernel
        self.scale = param(rngs, (cfg.d_model,), ("norm",), "ones")
        has_bias = cfg.norm == "layernorm" and cfg.use_bias
        self.bias = nnx.data(param(rngs, (cfg.d_model,), ("norm",), "zeros") if has_bias else None)

    @jax.named_scope("norm")
    def __call__(self, x: jax.Array) -> jax.Array:
        platform = attention._platform() if self.kernel == "pallas" else None
        if platform and _pallas_norm_runs_on(platform):
            bias = None if self.bias is None else self.bias[...]
            center, interpret = self.kind == "layernorm", platform == "cpu"
            return fused_norm.norm(x, self.scale[...], bias, self.eps, center, interpret)
        y = x.astype(jnp.float32)
        if self.kind == "layernorm":
            y = y - y.mean(-1, keepdims=True)
        y = y * jax.lax.rsqrt((y * y).mean(-1, keepdims=True) + self.eps) * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x.dtype)


def _pallas_norm_runs_on(platform: str) -> bool:
    """Whether `model.norm_kernel=pallas` runs on `platform`: on a GPU, and on a CPU in Pallas
    interpret mode; a TPU gets XLA's norm (the kernels are Triton's), said once."""
    if platform in ("gpu", "cpu"):
        return True
    _log_norm_fallback(platform)
    return False


@functools.cache
def _log_norm_fallback(platform: str) -> None:
    log.info("model.norm_kernel=pallas is a GPU (Triton) kernel; on %s: XLA's norm", platform)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (rotate-half form, as Llama) of x: [B, T, H, K]."""
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions[..., None].astype(jnp.float32) * freq  # B T K/2
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, n, k = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.cfg = cfg
        self.wq = param(rngs, (d, h, k), ("embed", "heads", "kv"), std)
        self.wk = param(rngs, (d, n, k), ("embed", "kv_heads", "kv"), std)
        self.wv = param(rngs, (d, n, k), ("embed", "kv_heads", "kv"), std)
        self.wo = param(rngs, (h, k, d), ("heads", "kv", "embed"), out_std)
        bias = cfg.use_bias
        self.bq = nnx.data(param(rngs, (h, k), ("heads", "kv"), "zeros") if bias else None)
        self.bk = nnx.data(param(rngs, (n, k), ("kv_heads", "kv"), "zeros") if bias else None)
        self.bv = nnx.data(param(rngs, (n, k), ("kv_heads", "kv"), "zeros") if bias else None)
        self.bo = nnx.data(param(rngs, (d,), ("norm",), "zeros") if bias else None)

    @jax.named_scope("attention")
    def __call__(
        self,
        x: jax.Array,
        mask: attention.Mask,
        positions: jax.Array,
        causal: bool,
        cache: dict | None = None,
    ) -> tuple[jax.Array, dict | None]:
        """(output, cache): with a KV cache (decoding), this call's keys and values are
        written into it at `positions` and attention runs over it."""
        cfg, dt = self.cfg, x.dtype
        q = jnp.einsum("BTD,DHK->BTHK", x, self.wq[...].astype(dt))
        k = jnp.einsum("BSD,DNK->BSNK", x, self.wk[...].astype(dt))
        v = jnp.einsum("BSD,DNK->BSNK", x, self.wv[...].astype(dt))
        if self.bq is not None:  # bk and bv: see _output_bias
            q = q + self.bq[...].astype(dt)
        if cfg.position == "rope":
            q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        with jax.named_scope("attention_kernel"):
            if cache is None:
                out = attention.attend(q, k, v, mask, causal, cfg.attention, cfg.max_segments)
            else:
                out, cache = attention.cached(q, k, v, cache, positions)
        y = jnp.einsum("BTHK,HKD->BTD", out, self.wo[...].astype(dt))
        if self.bo is not None:
            y = y + self._output_bias().astype(dt)
        return y, cache

    def _output_bias(self) -> jax.Array:
        """bo + bv @ wo. Each row's attention weights sum to one, so attending over v + bv
        is attending over v, plus bv, which the output projection maps to bv @ wo; and q . bk
        is the same for every key of a row, which the softmax ignores, so bk drops out (its
        gradient is zero; it stays a parameter for the checkpoints of the models that have
        it). The same outputs, without two [B, S, N, K] passes a layer that the GPU trace
        showed apart from the projections (31 us each in BERT-base's step on an H200) or the
        backward's reductions for their gradients. Rows that see no key at all exist only
        as padding no real position sees."""
        h, n = self.cfg.num_heads, self.cfg.kv_heads
        bv = jnp.repeat(self.bv[...], h // n, axis=0)  # query head h reads kv head h // (h/n)
        return self.bo[...] + jnp.einsum("HK,HKD->D", bv, self.wo[...])


def activation(x: jax.Array, kind: str) -> jax.Array:
    """The MLP's nonlinearity (`model.mlp` / `vision.mlp`, swiglu aside). gelu: exact,
    x * Phi(x) through erf. jax.nn.gelu's exact form goes through erfc, which XLA's GPU
    compiler expands into two rational approximations, an exp and divisions per element,
    and whose fusion keeps three [B, T, F] residuals: 6.4 of ViT-B/16's 103 ms in a traced
    H200 step (BENCHMARKS.md, 2026-12-04); erf is one approximation, and 1 + erf(x) loses
    relative precision only where GELU is within ~1e-7 |x| of 0. gelu_tanh: GPT-2's. quick_gelu:
    x * sigmoid(1.702 x), OpenAI's CLIP's: about half the instructions of either GELU in the
    fused forward and backward compiled for an H200."""
    if kind == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if kind == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    if kind == "gelu":
        return x * (0.5 + 0.5 * jax.lax.erf(x * math.sqrt(0.5)).astype(x.dtype))
    raise ValueError(f"activation {kind!r}: expected gelu, gelu_tanh or quick_gelu")


@functools.partial(jax.checkpoint, static_argnums=(3,))
def _hidden(h: jax.Array, bias: jax.Array | None, gate: jax.Array | None, kind: str) -> jax.Array:
    """The MLP's hidden activations from its first matmul's output h (and the gate's, for
    swiglu), recomputed in the backward pass from h, bias and gate rather than saved: autodiff
    would keep the nonlinearity's intermediates ([B, T, F] each), and XLA's GPU compiler
    writes one of them to memory for GPT-2's tanh GELU (its forward pass writes tanh's output
    beside the activations, its backward reads it back). Recomputed, the elementwise passes
    only read h: gpt2_124m's step compiled for an H200 moves 1.81 GB less (49.08 -> 47.27 GB
    of its operations' bytes, BENCHMARKS.md); the outputs and gradients are the same ops'."""
    if bias is not None:
        h = h + bias
    if kind == "swiglu":
        return jax.nn.silu(gate) * h
    return activation(h, kind)


class Mlp(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.mlp_dim
        self.kind = cfg.mlp
        self.wi = param(rngs, (d, f), ("embed", "mlp"), cfg.init_std)
        gated = cfg.mlp == "swiglu"
        self.wg = nnx.data(param(rngs, (d, f), ("embed", "mlp"), cfg.init_std) if gated else None)
        self.wo = param(
            rngs, (f, d), ("mlp", "embed"), cfg.init_std / math.sqrt(2 * cfg.num_layers)
        )
        bias = cfg.use_bias
        self.bi = nnx.data(param(rngs, (f,), ("mlp",), "zeros") if bias else None)
        self.bo = nnx.data(param(rngs, (d,), ("norm",), "zeros") if bias else None)

    @jax.named_scope("mlp")
    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        h = jnp.einsum("BTD,DF->BTF", x, self.wi[...].astype(dt))
        bias = None if self.bi is None else self.bi[...].astype(dt)
        gate = None
        if self.kind == "swiglu":
            gate = jnp.einsum("BTD,DF->BTF", x, self.wg[...].astype(dt))
        h = _hidden(h, bias, gate, self.kind)
        y = jnp.einsum("BTF,FD->BTD", h, self.wo[...].astype(dt))
        if self.bo is not None:
            y = y + self.bo[...].astype(dt)
        return y


class Block(nnx.Module):
    """Residual block. Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)). Post-norm (the
    original Transformer and BERT): norm(x + attn(x)), then norm(x + mlp(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.pre_norm = cfg.norm_position == "pre"
        self.attn_norm = Norm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg, rngs)
        self.mlp = Mlp(cfg, rngs)

    def __call__(self, x, mask: attention.Mask, positions, causal: bool, cache=None):
        if self.pre_norm:
            a, cache = self.attn(self.attn_norm(x), mask, positions, causal, cache)
            x = x + a
            x = x + self.mlp(self.mlp_norm(x))
        else:
            a, cache = self.attn(x, mask, positions, causal, cache)
            x = self.attn_norm(x + a)
            x = self.mlp_norm(x + self.mlp(x))
        return constrain(x, "batch", "seq", "act_embed"), cache


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
    """num_layers blocks whose parameters are stacked on a leading `layers` axis, run either
    with lax.scan (one compiled layer) or unrolled (faster on GPU); checkpoints are the same."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(
            in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS, "axes": LAYERS}
        )
        def stacked(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs)

        self.blocks = stacked(rngs)
        # Pre-norm stacks end with a norm; post-norm blocks already end with one.
        self.final_norm = nnx.data(Norm(cfg, rngs) if cfg.norm_position == "pre" else None)

    def __call__(self, x: jax.Array, mask: attention.Mask, positions: jax.Array, causal: bool):
        c, t = self.cfg, x.shape[1]
        pad = attention.stack_pad(c.attention, x.dtype, c.head_size, t, mask, c.max_segments)
        if pad:  # an odd length for cuDNN: padded once here, not around every layer's kernel
            x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
            positions = jnp.pad(positions, ((0, 0), (0, pad)), mode="edge")
            mask = mask.padded(pad)
        x, _ = self._run(x, mask, positions, causal, None)
        return x[:, :t] if pad else x

    def decode(self, x: jax.Array, positions: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """Causal decoding of x at positions [B, T] with the KV cache of every layer
        (`init_cache`): (output, updated cache)."""
        return self._run(x, attention.Mask(), positions, True, cache)

    def init_cache(self, batch: int, length: int) -> dict:
        """Keys and values of `length` positions for every layer, [L, B, S, N, K], laid out by
        logical axes (kv heads over `tensor`, rows over the batch axes)."""
        c = self.cfg
        shape = (c.num_layers, batch, length, c.kv_heads, c.head_size)
        zeros = jnp.zeros(shape, jnp.dtype(c.dtype))
        zeros = constrain(zeros, LAYERS, "batch", None, "kv_heads", "kv")
        return {"k": zeros, "v": zeros}

    def _run(self, x, mask, positions, causal: bool, cache: dict | None):
        graphdef, layers = nnx.split(self.blocks)

        def layer(x, weights_and_cache):
            weights, cache = weights_and_cache
            return nnx.merge(graphdef, weights)(x, mask, positions, causal, cache)

        if self.cfg.remat != "none" and cache is None:
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.cfg.remat])
        x = constrain(x, "batch", "seq", "act_embed")
        if self.cfg.scan_layers:
            x, cache = jax.lax.scan(layer, x, (layers, cache))
        else:
            caches = []
            for i in range(self.cfg.num_layers):
                x, c = layer(x, jax.tree.map(lambda w, i=i: w[i], (layers, cache)))
                caches.append(c)
            cache = None if cache is None else jax.tree.map(lambda *c: jnp.stack(c), *caches)
        return (x if self.final_norm is None else self.final_norm(x)), cache


def token_type_rows(table: jax.Array, types: jax.Array) -> jax.Array:
    """The rows of a token-type table [R, D] (BERT: R = 2) at `types` [B, T], as a sum of
    selects, not a gather: a gather's gradient is a scatter-add of every position into one of
    the few rows, whose atomic adds queue on them (by that, the 0.33 ms one of BERT-base's
    three embedding scatters in a 50 ms H200 step, BENCHMARKS.md); a select's is a reduction
    over the positions. Exact: zeros added."""
    rows = [jnp.where((types == r)[..., None], table[r], 0.0) for r in range(table.shape[0])]
    return functools.reduce(jnp.add, rows)


class Embed(nnx.Module):
    """Token embeddings, plus learned positions and token types where configured (and BERT's
    norm after them); also the tied output head."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, std = cfg.d_model, cfg.init_std
        self.tokens = param(rngs, (cfg.vocab_size, d), ("vocab", "embed"), std)
        learned, types = cfg.position == "learned", cfg.type_vocab_size
        self.positions = nnx.data(
            param(rngs, (cfg.position_rows, d), ("table", "embed"), std) if learned else None
        )
        self.types = nnx.data(param(rngs, (types, d), ("table", "embed"), std) if types else None)
        self.norm = nnx.data(Norm(cfg, rngs) if cfg.embed_norm else None)

    @jax.named_scope("embed")
    def __call__(
        self, ids: jax.Array, positions: jax.Array, types: jax.Array | None = None
    ) -> jax.Array:
        # Gather from tables whose model dimension is whole, so the lookup is local; the token
        # table is gathered to every device in the compute dtype (half of float32's bytes in
        # bfloat16), and only for the lookup: the stored table stays sharded.
        dtype = jnp.dtype(self.cfg.dtype)
        x = jnp.take(constrain(self.tokens[...].astype(dtype), None, None), ids, axis=0)
        if self.positions is not None:
            x = x + jnp.take(constrain(self.positions[...], None, None), positions, axis=0)
        if self.types is not None:
            types = jnp.zeros_like(ids) if types is None else types
            x = x + token_type_rows(constrain(self.types[...], None, None), types)
        if self.norm is not None:
            x = self.norm(x)
        return constrain(x.astype(jnp.dtype(self.cfg.dtype)), "batch", "seq", "act_embed")

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the token table (tied embeddings)."""
        return jnp.einsum("BTD,VD->BTV", x, self.tokens[...].astype(x.dtype))

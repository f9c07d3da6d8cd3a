"""LayerNorm / RMSNorm as two fused Pallas Triton kernels, forward and backward (`model.norm_kernel
=pallas`), for GPUs; in Pallas interpret mode on a CPU (slow: for tests).

Why: XLA's GPU compiler splits a norm's backward pass into several fusions with a float32
[rows, d] buffer between them, and its forward into a statistics pass and a normalising pass:
8.3 of BERT-base's 50 ms and 14.4 of CLIP ViT-B/16's 88 ms on an H200 (BENCHMARKS.md,
2026-12-04), several times what one read and one write of the activations need. Here the
forward reads x once and writes y and the row statistics; the backward reads x, dy and the
statistics once, writes dx, and leaves each program's partial sums of the scale's and bias's
gradients ([programs, d], summed by XLA). The row's d positions sit in one block (padded to a
power of two and masked), so d up to 8192. Rows are split over the mesh's batch axes with
shard_map (activations keep d whole: sharding.RULES' `act_embed`).

JAX 0.11 deprecates Pallas' Triton backend for its Mosaic GPU one (jax/_src/pallas/triton/
pallas_call_registration.py in 0.11.2, the GPU image's: a DeprecationWarning, the kernels
still lowered; its load, store and CompilerParams are those of 0.10.2). Should these kernels
earn their place on a GPU, their lasting form is a Mosaic GPU port.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxlm import sharding

BLOCK_ROWS = 4  # rows a forward program normalises (a [4, 1024] float32 tile for d = 768)
BACKWARD_PROGRAMS = 528  # 4 per streaming multiprocessor of an H100 / H200 (132)
MAX_D = 8192


def _tile(ref, rows, width, n: int, d: int):
    """(a [len(rows), width] tile of ref at those rows, masked past n rows and d columns,
    and the mask)."""
    mask = (rows < n)[:, None] & (jnp.arange(width) < d)[None, :]
    return plgpu.load(ref.at[rows[:, None], jnp.arange(width)[None, :]], mask=mask, other=0.0), mask


def _forward_kernel(x_ref, w_ref, b_ref, y_ref, mean_ref, rstd_ref, *, n, d, width, eps, center):
    rows = pl.program_id(0) * BLOCK_ROWS + jnp.arange(BLOCK_ROWS)
    x, mask = _tile(x_ref, rows, width, n, d)
    x = x.astype(jnp.float32)
    mean = jnp.sum(x, axis=1) / d if center else jnp.zeros((BLOCK_ROWS,), jnp.float32)
    xc = jnp.where(mask, x - mean[:, None], 0.0)
    rstd = jax.lax.rsqrt(jnp.sum(xc * xc, axis=1) / d + eps)
    cols = jnp.arange(width)
    w = plgpu.load(w_ref.at[cols], mask=cols < d, other=0.0).astype(jnp.float32)
    b = plgpu.load(b_ref.at[cols], mask=cols < d, other=0.0).astype(jnp.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    plgpu.store(y_ref.at[rows[:, None], cols[None, :]], y.astype(y_ref.dtype), mask=mask)
    plgpu.store(mean_ref.at[rows], mean, mask=rows < n)
    plgpu.store(rstd_ref.at[rows], rstd, mask=rows < n)


def _backward_kernel(
    x_ref, w_ref, dy_ref, mean_ref, rstd_ref, dx_ref, dw_ref, db_ref, *, n, d, width, center
):
    """Row blocks pid, pid + P, pid + 2P, ...: dx for each row, and the program's partial sums
    of dy * xhat (the scale's gradient) and dy (the bias's)."""
    pid, programs = pl.program_id(0), pl.num_programs(0)
    cols = jnp.arange(width)
    w = plgpu.load(w_ref.at[cols], mask=cols < d, other=0.0).astype(jnp.float32)

    def body(k, sums):
        rows = (pid + k * programs) * BLOCK_ROWS + jnp.arange(BLOCK_ROWS)
        x, mask = _tile(x_ref, rows, width, n, d)
        dy, _ = _tile(dy_ref, rows, width, n, d)
        x, dy = x.astype(jnp.float32), dy.astype(jnp.float32)
        mean = plgpu.load(mean_ref.at[rows], mask=rows < n, other=0.0)
        rstd = plgpu.load(rstd_ref.at[rows], mask=rows < n, other=0.0)
        xhat = jnp.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        c1 = jnp.sum(xhat * wdy, axis=1) / d
        dx = wdy - xhat * c1[:, None]
        if center:
            dx = dx - (jnp.sum(wdy, axis=1) / d)[:, None]
        dx = dx * rstd[:, None]
        plgpu.store(dx_ref.at[rows[:, None], cols[None, :]], dx.astype(dx_ref.dtype), mask=mask)
        return sums[0] + jnp.sum(dy * xhat, axis=0), sums[1] + jnp.sum(dy, axis=0)

    blocks = pl.cdiv(n, BLOCK_ROWS)
    zeros = jnp.zeros((width,), jnp.float32)
    dw, db = jax.lax.fori_loop(0, pl.cdiv(blocks, programs), body, (zeros, zeros))
    plgpu.store(dw_ref.at[pid, cols], dw, mask=cols < d)
    plgpu.store(db_ref.at[pid, cols], db, mask=cols < d)


def _params(width: int) -> plgpu.CompilerParams:
    """Warps by the row's padded width (4 for d = 768); stages as Pallas' default (3 on CUDA:
    the backward's loop over row blocks prefetches the next tiles)."""
    return plgpu.CompilerParams(num_warps=max(1, min(8, width // 256)))


def _forward(x2, w, b, eps: float, center: bool, interpret: bool):
    n, d = x2.shape
    width = pl.next_power_of_2(d)
    kernel = functools.partial(_forward_kernel, n=n, d=d, width=width, eps=eps, center=center)
    out_shape = (
        jax.ShapeDtypeStruct((n, d), x2.dtype),
        jax.ShapeDtypeStruct((n,), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.float32),
    )
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(n, BLOCK_ROWS),),
        compiler_params=_params(width),
        interpret=interpret,
        name="norm_forward",
    )(x2, w, b)


def _backward(x2, w, dy2, mean, rstd, center: bool, interpret: bool):
    n, d = x2.shape
    width = pl.next_power_of_2(d)
    programs = min(BACKWARD_PROGRAMS, pl.cdiv(n, BLOCK_ROWS))
    kernel = functools.partial(_backward_kernel, n=n, d=d, width=width, center=center)
    out_shape = (
        jax.ShapeDtypeStruct((n, d), x2.dtype),
        jax.ShapeDtypeStruct((programs, d), jnp.float32),
        jax.ShapeDtypeStruct((programs, d), jnp.float32),
    )
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(programs,),
        compiler_params=_params(width),
        interpret=interpret,
        name="norm_backward",
    )(x2, w, dy2, mean, rstd)


def _on_rows(fn, mesh, n_in: int, row_outputs: int, partial_outputs: int):
    """fn over [rows, ...] arrays, under shard_map where the mesh splits the rows: the first
    n_in arguments and row_outputs outputs are split by rows, the rest of the arguments are
    replicated, and partial_outputs outputs come back stacked by shard (summed by the caller)."""
    if mesh.empty or mesh.size == 1:
        return fn
    rows = sharding.logical_spec(("batch",), None, mesh)
    whole = jax.sharding.PartitionSpec()

    def specs(count_rows, count_other):
        return tuple([rows] * count_rows + [whole] * count_other)

    def wrapped(*args):
        return jax.shard_map(
            fn,
            mesh=mesh,
            in_specs=specs(n_in, len(args) - n_in),
            out_specs=specs(row_outputs, 0) + specs(partial_outputs, 0),
            check_vma=False,
        )(*args)

    return wrapped


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def norm(x: jax.Array, scale: jax.Array, bias, eps: float, center: bool, interpret: bool):
    """(x - mean) / sqrt(var + eps) * scale + bias over x's last axis (center=False: RMSNorm,
    no mean), computed in float32, returned in x's dtype; bias may be None."""
    return _norm_fwd(x, scale, bias, eps, center, interpret)[0]


def _norm_fwd(x, scale, bias, eps, center, interpret):
    shape, d = x.shape, x.shape[-1]
    if d > MAX_D:
        raise ValueError(f"model.norm_kernel=pallas: d_model {d} is over {MAX_D}")
    mesh = jax.sharding.get_abstract_mesh()
    rows = math.prod(shape[:-1])

    def local(x2, scale, shift):
        return _forward(x2, scale, shift, eps, center, interpret)

    shift = jnp.zeros_like(scale) if bias is None else bias  # no bias: adds zeros
    y, mean, rstd = _on_rows(local, mesh, 1, 3, 0)(x.reshape(rows, d), scale, shift)
    return y.reshape(shape), (x, scale, bias, mean, rstd)


def _norm_bwd(eps, center, interpret, residuals, dy):
    x, scale, bias, mean, rstd = residuals
    shape, d = x.shape, x.shape[-1]
    mesh = jax.sharding.get_abstract_mesh()
    rows = math.prod(shape[:-1])

    def local(x2, dy2, mean, rstd, scale):
        return _backward(x2, scale, dy2, mean, rstd, center, interpret)

    dx, dw, db = _on_rows(local, mesh, 4, 1, 2)(
        x.reshape(rows, d), dy.reshape(rows, d), mean, rstd, scale
    )
    dscale = dw.sum(0).astype(scale.dtype)
    dbias = None if bias is None else db.sum(0).astype(bias.dtype)
    return dx.reshape(shape), dscale, dbias


norm.defvjp(_norm_fwd, _norm_bwd)

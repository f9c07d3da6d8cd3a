"""Muon whose Newton-Schulz keeps sharded matrices sharded.

`optax.contrib.muon` leaves the layout of its Newton-Schulz iteration to the compiler. On a
(data, fsdp, tensor) mesh that gathers parts of each matrix inside the iteration, and on a pod
(llama_7b, fsdp 64) whole 32-layer stacks of matrices onto every device. Sharding
constraints alone did not do: asked to move a q/k/v projection from embed-split to
heads*kv-split, the partitioner replicated it whole ("involuntary full rematerialization").
Here the layout is explicit (`shard_map`). A weight is a matrix X of m x n with m <= n (a
scanned stack: a batch of them), and each iteration is

    A = X X^T                                 (m x m: the Gram matrix)
    X = a X + b (A X) + c (A (A X))           (= a X + (b A + c A A) X, optax's form)

X is split along its long side n over every mesh axis that splits the parameter (an axis
that split the short side moves over, one all-to-all of a shard's size). Then X X^T is a sum
of per-device products, summed by one all-reduce of m x m; A X and A (A X) are local. That
Gram matrix, whole on each device of the parameter's group, is what Newton-Schulz needs:
never X itself. Written as A (A X) rather than (A A) X, no m^3 product is repeated on every
device: each device does 6 m^2 n / (devices splitting X) multiply-adds per iteration. The
stack's layers go one at a time (`lax.map`), so one m x m Gram matrix is live, not
layers x m x m.

The rest is `optax.contrib.muon`'s: Nesterov momentum with bias correction, Keller Jordan's
quintic coefficients, Frobenius normalisation, the update scaled by sqrt(max(1, fan_out /
fan_in)); `tests/test_optimizers.py` holds the two equal."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec
from optax.contrib import MuonDimensionNumbers

from jaxlm.sharding import logical_spec

NS_COEFFS = (3.4445, -4.775, 2.0315)  # Keller Jordan's quintic, as optax.contrib.muon's


class MuonState(NamedTuple):
    count: jax.Array  # int32 []
    mu: Any  # the momentum, shaped and sharded as the parameters


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _mesh_axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def newton_schulz(
    x: jax.Array, steps: int, eps: float, axes: tuple[str, ...] = (), dtype: str = "float32"
) -> jax.Array:
    """Orthogonalize one m x n matrix (m <= n) whose columns are split over mesh `axes` (inside
    shard_map; none: the whole matrix here); the iteration in `dtype` (the norm in float32),
    the result in x's dtype."""
    total = (lambda y: jax.lax.psum(y, axes)) if axes else (lambda y: y)
    norm = jnp.sqrt(total(jnp.sum(jnp.square(x.astype(jnp.float32)))))
    out_dtype, x = x.dtype, (x / (norm + eps).astype(x.dtype)).astype(dtype)
    a, b, c = NS_COEFFS
    for _ in range(steps):
        gram = total(x @ x.T)
        ax = gram @ x
        x = a * x + b * ax + c * (gram @ ax)
    return x.astype(out_dtype)


def orthogonalize(
    x: jax.Array,
    dims: MuonDimensionNumbers,
    steps: int,
    eps: float,
    mesh: Mesh | None = None,
    spec: PartitionSpec | None = None,
    dtype: str = "float32",
) -> jax.Array:
    """Newton-Schulz (in `dtype`) on each matrix of x as `dims` reads it. With a mesh and x's
    partition spec the work stays in x's shards (module docstring); without, x is one array
    here."""
    red, out = tuple(dims.reduction_axis), tuple(dims.output_axis)
    batch = tuple(i for i in range(x.ndim) if i not in red + out)
    order = batch + red + out
    inverse = sorted(range(x.ndim), key=order.__getitem__)
    flip = math.prod(x.shape[i] for i in red) > math.prod(x.shape[i] for i in out)
    spec = PartitionSpec(*([None] * x.ndim)) if spec is None else spec
    entries = tuple(spec) + (None,) * (x.ndim - len(spec))
    used = lambda ix: tuple(a for i in ix for a in _mesh_axes(entries[i]))  # noqa: E731
    short_axes, long_axes = (used(out), used(red)) if flip else (used(red), used(out))
    # axes of size 1 split nothing; without a mesh, x is one whole array here
    short_axes = tuple(a for a in short_axes if mesh is not None and mesh.shape[a] > 1)
    long_axes = tuple(a for a in long_axes if mesh is not None and mesh.shape[a] > 1)

    def local(block: jax.Array) -> jax.Array:
        shape = [block.shape[i] for i in order]
        sizes = [
            math.prod(shape[: len(batch)]),
            math.prod(shape[len(batch) : len(batch) + len(red)]),
        ]
        mat = block.transpose(order).reshape(sizes[0], sizes[1], -1)
        mat = mat.swapaxes(1, 2) if flip else mat
        # Move each axis that splits the short side onto the long side (all-to-all); where
        # the long side's shard does not divide, gather the short side over it instead.
        moves = []
        for a in short_axes:
            if mat.shape[2] % mesh.shape[a] == 0:
                mat = jax.lax.all_to_all(mat, a, split_axis=2, concat_axis=1, tiled=True)
                moves.append((a, True))
            else:
                mat = jax.lax.all_gather(mat, a, axis=1, tiled=True)
                moves.append((a, False))
        split = long_axes + tuple(a for a, moved in moves if moved)
        mat = jax.lax.map(lambda m: newton_schulz(m, steps, eps, split, dtype), mat)
        for a, moved in reversed(moves):
            if moved:
                mat = jax.lax.all_to_all(mat, a, split_axis=1, concat_axis=2, tiled=True)
            else:
                rows = mat.shape[1] // mesh.shape[a]
                mat = jax.lax.dynamic_slice_in_dim(mat, jax.lax.axis_index(a) * rows, rows, 1)
        mat = mat.swapaxes(1, 2) if flip else mat
        return mat.reshape(shape).transpose(inverse)

    if not short_axes + long_axes:
        return local(x)
    return jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(x)


def _shape_scale(x: jax.Array, dims: MuonDimensionNumbers) -> float:
    fan_in = math.prod(x.shape[i] for i in dims.reduction_axis)
    fan_out = math.prod(x.shape[i] for i in dims.output_axis)
    return math.sqrt(max(1.0, fan_out / fan_in))


def scale_by_muon(
    dims_of, beta: float, steps: int, eps: float, mesh: Mesh | None, dtype: str = "float32"
) -> optax.GradientTransformation:
    """Momentum, then each matrix orthogonalized (Newton-Schulz in `dtype`) and scaled by its
    shape. `dims_of` maps a parameter (an nnx.Variable) to its MuonDimensionNumbers; every
    parameter reaching this transform has some (the others are masked out by
    `optax.transforms.partition`)."""

    def init(params):
        return MuonState(jnp.zeros([], jnp.int32), optax.tree.zeros_like(params))

    def update(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, beta, 1)
        count = optax.safe_increment(state.count)
        mu_hat = jax.tree.map(
            lambda m, g: beta * m + (1 - beta) * g,
            optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
            optax.tree.bias_correction(updates, beta, count),
        )

        def one(v: nnx.Variable) -> nnx.Variable:
            x, dims = v.get_value(), dims_of(v)
            spec = None if mesh is None else logical_spec(v.get_metadata()["axes"], x.shape, mesh)
            ortho = orthogonalize(x, dims, steps, eps, mesh, spec, dtype)
            return v.replace(ortho * _shape_scale(x, dims))

        updates = jax.tree.map(one, mu_hat, is_leaf=_is_variable)
        return updates, MuonState(count, mu)

    return optax.GradientTransformation(init, update)

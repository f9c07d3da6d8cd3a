"""Muon whose Newton-Schulz keeps sharded matrices sharded.

`optax.contrib.muon` leaves the layout of its Newton-Schulz iteration to the compiler, which
on a (data, fsdp, tensor) mesh all-gathers parts of each matrix inside the iteration. Here
the iteration runs on an explicit layout instead. A weight is viewed as a matrix X of m x n,
m <= n (the smaller side first; a scanned stack is a batch of them), and each iteration is

    A = X X^T                 (m x m: the Gram matrix)
    X = a X + (b A + c A A) X

With X split along its long side n over the mesh axes the parameter already uses, X X^T is a
sum of per-device products: each device computes its part and one all-reduce of m x m
(batch x m x m for a stack) sums them; the rest is local. That Gram matrix, whole on every
device of the parameter's group, is what Newton-Schulz needs: never X itself. Moving X
into that layout and back is an all-to-all between shards of the same size.

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
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from optax.contrib import MuonDimensionNumbers

from jaxlm.sharding import logical_spec

NS_COEFFS = (3.4445, -4.775, 2.0315)  # Keller Jordan's quintic, as optax.contrib.muon's


class MuonState(NamedTuple):
    count: jax.Array  # int32 []
    mu: Any  # the momentum, shaped and sharded as the parameters


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def long_side_axes(v: nnx.Variable, mesh: Mesh | None, n: int) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that split the parameter, as many of them as divide the
    matrix's long side n: those that split it along that side then."""
    if mesh is None:
        return ()
    spec = logical_spec(v.get_metadata()["axes"], v.get_value().shape, mesh)
    used = [a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
    axes = tuple(a for a in used if mesh.shape[a] > 1)
    while axes and n % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
    return axes


def orthogonalize(
    x: jax.Array,
    dims: MuonDimensionNumbers,
    steps: int,
    eps: float,
    mesh: Mesh | None = None,
    axes: tuple[str, ...] = (),
) -> jax.Array:
    """Newton-Schulz on each matrix of x as `dims` reads it, split along its long side over
    `axes` of `mesh` (no constraint without a mesh or axes: the parameter is not split)."""
    red, out = tuple(dims.reduction_axis), tuple(dims.output_axis)
    batch = tuple(i for i in range(x.ndim) if i not in red + out)
    order = batch + red + out
    shape = [x.shape[i] for i in order]
    size = lambda ix: math.prod(x.shape[i] for i in ix)  # noqa: E731
    mat = x.transpose(order).reshape(size(batch), size(red), size(out))
    flip = mat.shape[1] > mat.shape[2]
    if flip:
        mat = mat.swapaxes(1, 2)

    def split(y: jax.Array) -> jax.Array:
        if mesh is None or not axes:
            return y
        return jax.lax.with_sharding_constraint(
            y, NamedSharding(mesh, PartitionSpec(None, None, axes))
        )

    def whole(y: jax.Array) -> jax.Array:
        if mesh is None or not axes:
            return y
        return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, PartitionSpec()))

    mat = split(mat)
    norm = jnp.sqrt(jnp.sum(jnp.square(mat), axis=(1, 2), keepdims=True))
    mat = mat / (norm + eps)
    a, b, c = NS_COEFFS
    for _ in range(steps):
        gram = whole(jnp.einsum("bmn,bkn->bmk", mat, mat))
        poly = b * gram + c * jnp.einsum("bmk,bkl->bml", gram, gram)
        mat = split(a * mat + jnp.einsum("bmk,bkn->bmn", poly, mat))
    if flip:
        mat = mat.swapaxes(1, 2)
    inverse = sorted(range(x.ndim), key=order.__getitem__)
    return mat.reshape(shape).transpose(inverse)


def _shape_scale(x: jax.Array, dims: MuonDimensionNumbers) -> float:
    fan_in = math.prod(x.shape[i] for i in dims.reduction_axis)
    fan_out = math.prod(x.shape[i] for i in dims.output_axis)
    return math.sqrt(max(1.0, fan_out / fan_in))


def scale_by_muon(
    dims_of, beta: float, steps: int, eps: float, mesh: Mesh | None
) -> optax.GradientTransformation:
    """Momentum, then each matrix orthogonalized and scaled by its shape. `dims_of` maps a
    parameter (an nnx.Variable) to its MuonDimensionNumbers; every parameter reaching this
    transform has some (the others are masked out by `optax.transforms.partition`)."""

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
            n = max(
                math.prod(x.shape[i] for i in dims.reduction_axis),
                math.prod(x.shape[i] for i in dims.output_axis),
            )
            ortho = orthogonalize(x, dims, steps, eps, mesh, long_side_axes(v, mesh, n))
            return v.replace(ortho * _shape_scale(x, dims))

        updates = jax.tree.map(one, mu_hat, is_leaf=_is_variable)
        return updates, MuonState(count, mu)

    return optax.GradientTransformation(init, update)

"""The pure part of training: sharded train state, `train_step` and `eval_step`, MFU.

Kept apart from the loop (train.py) so that benchmarks and evaluation need neither Grain nor
Orbax. The train state is a plain dict `{"params", "opt_state", "step"}`; the model's NNX
graph definition stays outside and is merged with the parameters inside each jitted step.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import attention, clip, lm, mlm, optim
from jaxlm.config import Config
from jaxlm.sharding import logical_spec

OBJECTIVES: dict[str, ModuleType] = {"lm": lm, "mlm": mlm, "clip": clip}


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything derived from a config and a mesh, before any array exists."""

    cfg: Config
    mesh: Mesh
    objective: ModuleType
    graphdef: Any
    tx: optax.GradientTransformation
    shardings: Any  # train-state pytree of NamedSharding
    abstract: Any  # train-state pytree of ShapeDtypeStruct carrying those shardings

    def init(self) -> dict:
        """A freshly initialised train state, each array created directly in its shards."""
        key = jax.random.key(self.cfg.train.seed)
        return jax.jit(self._init_fn, out_shardings=self.shardings)(key)

    def _init_fn(self, key: jax.Array) -> dict:
        model = self.objective.make_model(self.cfg, nnx.Rngs(params=key))
        params = nnx.state(model, nnx.Param)
        return {
            "params": params,
            "opt_state": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32),
        }

    def model(self, params: Any) -> nnx.Module:
        return nnx.merge(self.graphdef, params)

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.abstract["params"]))


def build(cfg: Config, mesh: Mesh) -> Setup:
    objective = OBJECTIVES[cfg.objective]
    tx = optim.make(cfg.optim, cfg.train.steps, mesh)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: objective.make_model(cfg, nnx.Rngs(0))))
    setup = Setup(cfg, mesh, objective, graphdef, tx, None, None)
    shapes = jax.eval_shape(setup._init_fn, jax.random.key(0))

    def sharding(x: Any) -> Any:
        if _is_variable(x):  # parameters and their optimizer moments carry logical axes
            shape, axes = getattr(x.get_value(), "shape", None), x.get_metadata()["axes"]
            if shape is None:  # no array: a moment Muon keeps for other parameters only
                return x
            # a moment of another shape (Adafactor's factored rows and columns) is small:
            # replicated
            spec = logical_spec(axes, shape, mesh) if len(shape) == len(axes) else PartitionSpec()
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    shardings = jax.tree.map(sharding, shapes, is_leaf=_is_variable)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )
    return dataclasses.replace(setup, shardings=shardings, abstract=abstract)


def _fallbacks(cfg: Config, segment_ids: jax.Array | None) -> dict:
    """With model.max_segments over packed documents (not CLIP's), {max_segments_exceeded:
    how many of the micro-batches segment_ids [N, B, T] ran the dense mask rather than
    cuDNN's packed layout}; else {}. The one rule for the train and eval steps."""
    if segment_ids is None or not (cfg.model.max_segments and cfg.model.document_mask):
        return {}
    return {
        "max_segments_exceeded": attention.over_max_segments(segment_ids, cfg.model.max_segments)
    }


def make_train_step(s: Setup) -> Callable[[dict, Any], tuple[dict, dict]]:
    """jit(train_step): (state, batch) -> (state, metrics), state donated."""
    cfg, accum = s.cfg, s.cfg.train.grad_accum
    schedule = optim.schedule(cfg.optim, cfg.train.steps)

    def grads_of(params, batch, rng):
        def loss(p):
            return s.objective.loss_fn(s.model(p), batch, rng)

        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return grads, metrics

    def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
        rng = jax.random.fold_in(jax.random.key(cfg.train.seed), state["step"])
        params = state["params"]
        # Row r of micro-batch a is global row r * accum + a: every micro-batch keeps the
        # batch's sharding, so each device works on its own rows at every micro-step.
        micro = jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1),
            batch,
        )
        if accum == 1:
            grads, metrics = grads_of(params, batch, rng)
        elif hasattr(s.objective, "accumulated_grads"):  # a loss over the whole batch
            grads, metrics = s.objective.accumulated_grads(s.model, params, micro, accum)
        else:

            def body(total, i):
                # Sums weighted by each micro-batch's token count, so that the result is the
                # token-weighted mean over the whole batch, as without accumulation.
                mb = jax.tree.map(lambda x: x[i], micro)
                grads, metrics = grads_of(params, mb, jax.random.fold_in(rng, i))
                w = metrics["tokens"]
                scaled = {k: v * w for k, v in metrics.items() if k != "tokens"} | {"tokens": w}
                out = (jax.tree.map(lambda g: g * w, grads), scaled)
                return jax.tree.map(jnp.add, total, out), None

            zeros = jax.tree.map(
                lambda x: jnp.zeros(x.shape, x.dtype),
                jax.eval_shape(grads_of, params, jax.tree.map(lambda x: x[0], micro), rng),
            )
            (grads, metrics), _ = jax.lax.scan(body, zeros, jnp.arange(accum))
            tokens = jnp.maximum(metrics["tokens"], 1.0)
            grads = jax.tree.map(lambda g: g / tokens, grads)
            metrics = {k: v / tokens for k, v in metrics.items() if k != "tokens"} | {
                "tokens": metrics["tokens"]
            }
        metrics |= _fallbacks(cfg, micro.get("segment_ids"))
        with jax.named_scope("optimizer"):  # clipping included
            updates, opt_state = s.tx.update(grads, state["opt_state"], params)
            params = optax.apply_updates(params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]))
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, metrics

    return jax.jit(
        train_step,
        in_shardings=(s.shardings, NamedSharding(s.mesh, logical_spec(("batch", None)))),
        out_shardings=(s.shardings, None),
        donate_argnums=0,
    )


def make_eval_step(s: Setup) -> Callable[[Any, Any], dict]:
    """jit(eval_step): (params, batch) -> metrics summed over tokens, plus `tokens` (and, with
    model.max_segments, `max_segments_exceeded`: a count, not a sum over tokens)."""

    def eval_step(params: Any, batch: dict) -> dict:
        _, metrics = s.objective.loss_fn(s.model(params), batch, jax.random.key(0))
        tokens = metrics.pop("tokens")
        segments = batch.get("segment_ids")  # the batch as one micro-batch
        fallbacks = _fallbacks(s.cfg, None if segments is None else segments[None])
        return {**{k: v * tokens for k, v in metrics.items()}, "tokens": tokens, **fallbacks}

    return jax.jit(
        eval_step,
        in_shardings=(s.shardings["params"], NamedSharding(s.mesh, logical_spec(("batch", None)))),
    )


# Dense bf16 peak FLOP/s per chip from the data sheets, by the `device_kind` JAX reports. The
# first pattern that matches wins, so variants come before the family: an H100 PCIe is not an
# SXM, an L40S is not an L4, and a v5p reports itself as "TPU v5" (a v5e as "TPU v5 lite").
PEAK_FLOPS = (
    (r"\bH100 PCIe\b", "H100 PCIe", 756e12),
    (r"\bH100 NVL\b", "H100 NVL", 835e12),
    (r"\b(GH200|H200|H100)\b", "H100 / H200 SXM", 989e12),
    (r"\bA100\b", "A100", 312e12),
    (r"\bL40S\b", "L40S", 362e12),
    (r"\bL4$", "L4", 121e12),
    (r"^TPU v6( lite|e)$", "TPU v6e", 918e12),
    (r"^TPU v5( lite|e)$", "TPU v5e", 197e12),
    (r"^TPU v5p?$", "TPU v5p", 459e12),
    (r"^TPU v4$", "TPU v4", 275e12),
)


def device_peak_flops(kind: str) -> tuple[float, str] | None:
    """(peak FLOP/s of one device, table row) for a `device_kind`, or None if unknown."""
    for pattern, name, flops in PEAK_FLOPS:
        if re.search(pattern, kind.strip()):
            return flops, name
    return None


def sync_every() -> int:
    """Steps between forced syncs: 8 on CPU, whose collectives deadlock when too many steps
    are queued unsynced; 0 (only where the loop logs) on accelerators, which must not wait."""
    return 8 if jax.devices()[0].platform == "cpu" else 0


def peak_flops(override: float = 0.0) -> tuple[float, str]:
    """Total peak FLOP/s of all devices, and where the figure came from."""
    devices = jax.devices()
    if override:
        return override * len(devices), "train.peak_flops"
    kind = devices[0].device_kind
    found = device_peak_flops(kind)
    if found is not None:
        return found[0] * len(devices), f"{found[1]} bf16 data sheet"
    if devices[0].platform == "cpu":
        # Fake CPU devices share the same cores: the machine's peak is one measured matmul.
        return _measured_matmul_flops(), "measured float32 matmul on this CPU"
    return float("nan"), f"unknown device {kind!r}: set train.peak_flops"


def one_device_matmul(n: int) -> Callable[[], jax.Array]:
    """A call computing a @ a (n x n, float32) on the first local device, whatever mesh is
    set: under the training loop's `jax.set_mesh` a plain jnp array is replicated, and the
    matmul ran on all 8 fake devices at once (the measured peak 8x low, a tiny run's MFU
    177%)."""
    one = Mesh(np.asarray(jax.local_devices()[:1]), ("one",))
    with jax.set_mesh(one):
        a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)

    def run() -> jax.Array:
        with jax.set_mesh(one):
            return f(a)

    return run


def _measured_matmul_flops(n: int = 2048, tries: int = 10) -> float:
    """Best of a few large float32 matmuls: close to what this CPU can do at best."""
    run = one_device_matmul(n)
    run().block_until_ready()
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        run().block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best

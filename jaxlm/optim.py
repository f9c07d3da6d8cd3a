"""Optimizers (AdamW, Muon, Lion, Adafactor) with a learning-rate schedule (warmup, then
cosine, warmup-stable-decay or constant), global-norm clipping and a weight-decay mask.

Muon orthogonalizes the update of each weight matrix (Newton-Schulz); which parameters are
matrices, and which of their axes are inputs, comes from the logical axis names, not from
array ranks (`muon_dims`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from optax.contrib import MuonDimensionNumbers

from jaxlm import muon
from jaxlm.config import OptimConfig
from jaxlm.layers import EMBED, LAYERS

ADAM_AXES = ("vocab", "table")  # token / position / type embeddings and the output head


def schedule(cfg: OptimConfig, steps: int) -> optax.Schedule:
    """The learning rate at each step of a run of `steps` steps. Warmup is linear from 0.

    wsd (warmup-stable-decay): the peak rate until the last `decay_fraction` of the steps, then
    down to lr * min_lr_ratio, linearly or as 1 - sqrt (Hägele et al. 2024). Its rate at a
    step before the decay does not depend on `steps`: a run checkpointed there and resumed with
    a larger train.steps continues exactly as a run that had the larger value from the start,
    which is how a WSD run is extended. A cosine run resumed so has had the shorter run's
    rates up to the checkpoint and follows the longer cosine from it: neither run."""
    warmup = min(cfg.warmup_steps, steps)
    if cfg.schedule == "constant":
        return lambda step: cfg.lr * _warm(step, warmup)
    if cfg.schedule == "wsd":
        return _wsd(cfg, steps, warmup)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def _warm(step, warmup: int):
    """Linear warmup from 0 over `warmup` steps; none (the peak from step 0) for 0."""
    if not warmup:
        return jnp.ones_like(jnp.asarray(step, jnp.float32))
    return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup)


def decay_start(cfg: OptimConfig, steps: int) -> int:
    """The first step of a WSD run's decay: the last step that a run of `steps` steps can be
    extended from as if it had been longer from the start."""
    return steps - max(1, round(cfg.decay_fraction * steps))


def _wsd(cfg: OptimConfig, steps: int, warmup: int) -> optax.Schedule:
    start, end = decay_start(cfg, steps), cfg.lr * cfg.min_lr_ratio
    decay = steps - start

    def rate(step):
        step = jnp.asarray(step, jnp.float32)
        warm = cfg.lr * _warm(step, warmup)
        done = jnp.clip((step - start) / decay, 0.0, 1.0)
        left = 1.0 - (done if cfg.decay_shape == "linear" else jnp.sqrt(done))
        # the lower of the two: the same as warmup-then-decay when they do not overlap, and
        # no jump up to the peak where a short run's decay begins inside its warmup
        return jnp.where(step < start, warm, jnp.minimum(warm, end + (cfg.lr - end) * left))

    return rate


def decay_mask(params: nnx.State) -> nnx.State:
    """Decay the weight matrices only, not biases, norm scales or the CLIP temperature (as
    GPT-2 and Llama). A matrix maps to or from the model width: it has an `embed` axis and at
    least one other besides `layers`. Neither ndim nor the axis count alone tells: stacked
    layers make every bias 2-D, and a q/k/v bias is [heads, kv]."""

    def decays(v: nnx.Variable) -> nnx.Variable:
        axes = [a for a in v.get_metadata()["axes"] if a != LAYERS]
        return v.replace(EMBED in axes and len(axes) >= 2)

    return jax.tree.map(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def muon_dims(v: nnx.Variable) -> MuonDimensionNumbers | None:
    """How Muon sees a parameter: None (it goes to AdamW) for embeddings and the output head
    (a `vocab` or `table` axis), norms, biases and scalars (no `embed` axis, or one axis
    besides `layers`); else a matrix whose reduction (input) axes are `embed` where `embed`
    comes first (q/k/v [embed, heads, kv]: embed x heads*kv; an MLP's up-projection) or every
    axis but `embed` where it does not (the output projection [heads, kv, embed]: heads*kv x
    embed); `layers` (a scanned stack) is a batch axis: each layer its own matrix."""
    axes = list(v.get_metadata()["axes"])
    inner = [i for i, a in enumerate(axes) if a != LAYERS]
    if any(a in ADAM_AXES for a in axes) or EMBED not in axes or len(inner) < 2:
        return None
    embed = axes.index(EMBED)
    others = tuple(i for i in inner if i != embed)
    if embed == inner[0]:
        return MuonDimensionNumbers(reduction_axis=(embed,), output_axis=others)
    return MuonDimensionNumbers(reduction_axis=others, output_axis=(embed,))


def _muon(cfg: OptimConfig, steps: int, rate: optax.Schedule, mesh: Mesh | None):
    """Muon for the matrices, AdamW for the rest, as `optax.contrib.muon` composes them; the
    AdamW part (embeddings, head, norms, biases) without weight decay (optax's decays that
    whole part alike, norms and biases too), every Muon matrix with it."""
    adam_rate = schedule(dataclasses.replace(cfg, lr=cfg.muon_adam_lr or cfg.lr), steps)

    def labels(params: nnx.State):
        return jax.tree.map(
            lambda v: "adam" if muon_dims(v) is None else "muon",
            params,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )

    matrices = optax.chain(
        muon.scale_by_muon(
            muon_dims, cfg.muon_beta, cfg.muon_ns_steps, cfg.eps, mesh, cfg.muon_dtype
        ),
        optax.add_decayed_weights(cfg.weight_decay),
        optax.scale_by_learning_rate(rate),
    )
    rest = optax.adamw(
        adam_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=0.0, nesterov=True
    )
    return optax.transforms.partition({"muon": matrices, "adam": rest}, labels)


def make(cfg: OptimConfig, steps: int, mesh: Mesh | None = None) -> optax.GradientTransformation:
    """The optimizer of `cfg` for a run of `steps` steps. With the mesh, Muon's Newton-Schulz
    runs on each matrix in its own shards (jaxlm/muon.py)."""
    rate = schedule(cfg, steps)
    if cfg.name == "muon":
        tx = _muon(cfg, steps, rate, mesh)
    elif cfg.name == "lion":
        tx = optax.lion(
            rate, b1=cfg.b1, b2=cfg.lion_b2, weight_decay=cfg.weight_decay, mask=decay_mask
        )
    elif cfg.name == "adafactor":
        tx = optax.adafactor(
            rate,
            multiply_by_parameter_scale=False,  # the schedule is the step size, as for AdamW
            weight_decay_rate=cfg.weight_decay,
            weight_decay_mask=decay_mask,
        )
    else:
        tx = optax.adamw(
            rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
        )
    # clip_norm=0: no clipping (optax's clip to 0 would zero every update); identity keeps
    # the state's form, so a resume may switch it
    clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm else optax.identity()
    return optax.chain(clip, tx)

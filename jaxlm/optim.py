"""AdamW with a learning-rate schedule (warmup, then cosine, warmup-stable-decay or constant),
global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlm.config import OptimConfig
from jaxlm.layers import EMBED, LAYERS


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
        return lambda step: cfg.lr * jnp.minimum(1.0, (step + 0.0) / max(warmup, 1))
    if cfg.schedule == "wsd":
        return _wsd(cfg, steps, warmup)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def _wsd(cfg: OptimConfig, steps: int, warmup: int) -> optax.Schedule:
    decay = max(1, round(cfg.decay_fraction * steps))
    start, end = steps - decay, cfg.lr * cfg.min_lr_ratio

    def rate(step):
        step = jnp.asarray(step, jnp.float32)
        warm = cfg.lr * jnp.minimum(1.0, step / max(warmup, 1))
        done = jnp.clip((step - start) / decay, 0.0, 1.0)
        left = 1.0 - (done if cfg.decay_shape == "linear" else jnp.sqrt(done))
        return jnp.where(step < start, warm, end + (cfg.lr - end) * left)

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


def make(cfg: OptimConfig, steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(
            schedule(cfg, steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        ),
    )

"""The (data, fsdp, tensor) device mesh and the one table from logical axis names to mesh axes.

Parameters and activations are named by what their dimensions mean (`embed`, `heads`, ...);
`RULES` is the only place that says how those names are laid out on devices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")
T = TypeVar("T")

# logical name -> mesh axis (or tuple of axes, or None for replicated)
RULES = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),  # parameters: ZeRO-3 style, gathered per layer by the compiler
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("table", None),  # rows of a lookup table other than the vocabulary: positions, token types
    ("norm", None),
    ("act_embed", None),  # activations keep the model dimension whole
)
_names = [name for name, _ in RULES]
if len(_names) != len(set(_names)):
    raise RuntimeError(f"sharding.RULES maps a logical name twice: {_names}")
RULES_DICT = dict(RULES)


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolve one -1 axis and check the product equals the device count."""
    shape = [cfg.data, cfg.fsdp, cfg.tensor]
    free = [i for i, n in enumerate(shape) if n == -1]
    if len(free) > 1 or any(n == 0 or n < -1 for n in shape):
        raise ConfigError(
            f"mesh (data={cfg.data}, fsdp={cfg.fsdp}, tensor={cfg.tensor}): each axis must be "
            "positive, and at most one may be -1"
        )
    if free:
        rest = math.prod(n for n in shape if n != -1)
        if num_devices % rest:
            raise ConfigError(
                f"mesh (data={cfg.data}, fsdp={cfg.fsdp}, tensor={cfg.tensor}) does not divide "
                f"the {num_devices} devices"
            )
        shape[free[0]] = num_devices // rest
    if math.prod(shape) != num_devices:
        raise ConfigError(
            f"mesh (data={shape[0]}, fsdp={shape[1]}, tensor={shape[2]}) needs "
            f"{math.prod(shape)} devices, but there are {num_devices}"
        )
    return tuple(shape)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    if devices == jax.devices():
        return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def logical_spec(
    names: tuple, shape: tuple | None = None, mesh: Mesh | None = None
) -> PartitionSpec:
    """Logical names -> PartitionSpec. With a shape and mesh, a dimension that does not divide
    its mesh axes is replicated instead (e.g. a 50257 vocabulary over 4 tensor devices)."""
    spec = []
    for i, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in RULES_DICT:
            raise KeyError(f"logical axis {name!r} is not in sharding.RULES")
        axes = RULES_DICT[name]
        if axes is not None and shape is not None and mesh is not None:
            size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
            if shape[i] % size:
                axes = None
        spec.append(axes)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, *names) -> jax.Array:
    """Activation sharding hint by logical names (used at block boundaries only)."""
    return jax.lax.with_sharding_constraint(x, logical_spec(names))


def to_global(local: dict, mesh: Mesh) -> dict:
    """This process's rows of a batch -> global arrays split over the batch axes."""
    return {
        k: jax.make_array_from_process_local_data(
            NamedSharding(mesh, logical_spec(("batch",) + (None,) * (np.ndim(v) - 1))), v
        )
        for k, v in local.items()
    }


def from_full(full: dict, mesh: Mesh) -> dict:
    """The whole batch, present on every process -> global arrays split over the batch axes
    (each process places the rows its devices hold)."""
    sharding = NamedSharding(mesh, logical_spec(("batch", None)))
    return {
        k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
        for k, v in full.items()
    }


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch(batch_size: int, grad_accum: int, mesh: Mesh) -> None:
    dp = data_parallel_size(mesh)
    micro = batch_size // grad_accum
    if micro % dp:
        raise ConfigError(
            f"train.batch_size={batch_size} (micro-batch {micro} with train.grad_accum="
            f"{grad_accum}) is not divisible by the data-parallel size {dp} "
            f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})"
        )
    if batch_size % jax.process_count():
        raise ConfigError(
            f"train.batch_size={batch_size} is not divisible by the {jax.process_count()} processes"
        )


MESSAGE_BYTES = 4096  # what of process 0's error the others print (the rest is in its log)


def on_process_0(what: str, work: Callable[[], T]) -> T | None:
    """`work()` on process 0 only (writing a tokenizer, preparing a corpus, opening W&B), the
    other processes waiting for it; returns its result there, None elsewhere. If it raises,
    every process raises at once: process 0 its own error, the others a ConfigError (for a
    ConfigError, one with the same message) or a RuntimeError naming it. Without this, a
    mistake found on process 0 alone (a missing data.tokenizer) left the others waiting at the
    next collective until jax.distributed's shutdown gave up minutes later, with an abort."""
    if jax.process_count() == 1:
        return work()
    from jax.experimental import multihost_utils

    result, error, said = None, None, b""
    if jax.process_index() == 0:
        try:
            result = work()
        except Exception as e:  # shared with the others below, then raised here as it was
            error = e
            kind = "" if isinstance(e, ConfigError) else f"{type(e).__name__}: "
            said = f"{kind}{e}".encode()[:MESSAGE_BYTES]
    buffer = np.zeros(MESSAGE_BYTES + 1, np.uint8)  # [0]: 0 ok, 1 a ConfigError, 2 another
    if error is not None:
        buffer[0] = 1 if isinstance(error, ConfigError) else 2
        buffer[1 : 1 + len(said)] = np.frombuffer(said, np.uint8)
    buffer = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    if error is None and buffer[0]:
        message = bytes(buffer[1:]).rstrip(b"\0").decode(errors="replace")
        if buffer[0] == 1:
            error = ConfigError(f"{message} (found on process 0, while {what})")
        else:
            error = RuntimeError(f"process 0 failed while {what}: {message} (see its log)")
    if error is not None:
        error.on_every_process = True  # type: ignore[attr-defined]  # see raised_together
        raise error
    return result


def raised_together(error: BaseException) -> bool:
    """Whether every process of the job raised this error at the same point (on_process_0's),
    so that all can leave through jax.distributed's shutdown barrier together."""
    return getattr(error, "on_every_process", False)

"""Joining JAX's multi-controller runtime (`--distributed`): which process this is, and which
of the machine's GPUs it drives.

Under SLURM and Open MPI's mpirun, `jax.distributed.initialize()` finds the coordinator, the
process count and this process's id itself, and it also picks the GPUs: the local-rank-th GPU
the process sees, one each (JAX's clusters/cluster.py), which is right only for a process per
GPU with every process seeing all of them. Launchers run other layouts, and for them JAX's pick
is wrong without a word:

- one task per node with the node's 8 GPUs (launch/slurm.sbatch, `mpirun -npernode 1`): GPU 0
  alone, 7 idle;
- SLURM's `--gpus-per-task=1`: each task sees one GPU, its ordinal 0, and JAX asks for ordinal
  SLURM_LOCALID, which does not exist (jax-ml/jax#23452, MaxText #865 and #3433).

So jaxlm reads what the launcher gave the process and passes `local_device_ids` itself: a
process that sees GPUs of its own drives all of them; processes that see the same GPUs split
them evenly in local-rank order. The variables and their values are the launchers' own,
recorded from srun (SLURM 22.05) and mpirun (Open MPI 4.1) in tests/golden/launcher_env.json.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from jaxlm.config import ConfigError

NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one entry per GPU the driver sees
# what JAX's SlurmCluster needs to find SLURM (jax/_src/clusters/slurm_cluster.py)
SLURM_VARIABLES = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)


def init(heartbeat_timeout: int = 100) -> None:
    """Join JAX's multi-controller runtime before any device is touched. A process that
    stops sending heartbeats for heartbeat_timeout seconds is declared dead, and JAX then
    ends every other process with an error naming it (instead of leaving them waiting)."""
    import jax

    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env and "JAX_NUM_PROCESSES" in env:  # launch/local.sh
        jax.distributed.initialize(
            env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
            heartbeat_timeout_seconds=heartbeat_timeout,
        )
    else:  # TPU pod, SLURM, Open MPI: JAX finds the rest in the environment
        machine = _gpus_in_machine()
        gpus = local_device_ids(env, machine)
        jax.distributed.initialize(
            heartbeat_timeout_seconds=heartbeat_timeout, local_device_ids=gpus
        )
        if gpus is not None and (place := _place(env)) is not None:  # chosen for a place
            logging.info(
                "%s: process %d on %s (local rank %d of %d): GPUs %s of the ones it sees (%s)",
                place.launcher,
                jax.process_index(),
                place.node,
                place.local_rank,
                place.local_size,
                ",".join(map(str, gpus)),
                _visible(env) or f"all {machine} of the machine",
            )
    check_devices_per_process([d.process_index for d in jax.devices()])


def check_devices_per_process(owners: list[int]) -> None:
    """Every process must hold as many devices (owners: each device's process): a process's
    share of a global batch, JAX's multihost_utils and the mesh assume it, and otherwise the
    first gather fails deep in JAX (`cannot reshape array of size 6 into shape (2,4)`). Every
    process sees the same device list, so all raise this together, and say so: they then
    leave through jax.distributed's shutdown barrier, each once the others are there. Process
    0 leaving at once (as after an error of its own) took the coordination service with it
    while another process was still starting its backend, which then failed with
    "Connection reset by peer" instead of this message (seen once in CI, 2026-12-04)."""
    counts = Counter(owners)
    if len(set(counts.values())) > 1:
        each = ", ".join(f"process {p}: {n}" for p, n in sorted(counts.items()))
        error = ConfigError(
            f"the processes hold different numbers of devices ({each}); jaxlm needs the same "
            "number on every process: give each process as many GPUs (the same number of "
            "processes on every node; on CPUs, the same XLA_FLAGS device count)"
        )
        error.on_every_process = True  # type: ignore[attr-defined]  # sharding.raised_together
        raise error


@dataclass(frozen=True)
class Place:
    """Where a launcher put this process: its rank among the processes of its machine, how
    many share the machine, and how many GPUs the job holds there (None: not said)."""

    launcher: str
    node: str
    local_rank: int
    local_size: int
    gpus_on_node: int | None


def local_device_ids(env: Mapping[str, str], gpus_in_machine: int | None) -> list[int] | None:
    """The ordinals of the GPUs this process drives (CUDA numbers the GPUs a process sees
    0, 1, ... whatever CUDA_VISIBLE_DEVICES names), or None to leave the choice to JAX: no
    launcher that JAX reads local ranks from, JAX_LOCAL_DEVICE_IDS given, or no GPU known (a
    CPU or TPU host).

    gpus_in_machine counts the machine's GPUs when the launcher does not name them (mpirun;
    SLURM without GPU gres or with --gpu-bind=none): the process then sees all of them."""
    if env.get("JAX_LOCAL_DEVICE_IDS"):
        return None
    visible = _visible(env)
    seen = len(visible.split(",")) if visible else gpus_in_machine
    if not seen:
        return None
    place = _place(env)
    if place is None:
        return None
    tasks, on_node = place.local_size, place.gpus_on_node
    if tasks == 1 or (on_node is not None and seen < on_node):
        return list(range(seen))  # its own GPUs (one process, or SLURM bound each its share)
    if seen % tasks:
        raise ConfigError(
            f"{place.launcher} runs {tasks} processes on {place.node}, which share the {seen} "
            f"GPUs they see ({visible or 'all of the machine'}), and {seen} does not split "
            "evenly among them: run one process per node (launch/slurm.sbatch) or one per "
            "GPU, or set JAX_LOCAL_DEVICE_IDS"
        )
    each = seen // tasks
    return list(range(place.local_rank * each, (place.local_rank + 1) * each))


def _place(env: Mapping[str, str]) -> Place | None:
    """This process's place, from the launcher JAX detects: Open MPI before SLURM, the order
    JAX checks them in (jax/_src/clusters/__init__.py), as mpirun may run inside a SLURM job."""
    if "OMPI_MCA_orte_hnp_uri" in env:  # what JAX's OmpiCluster looks for
        return Place(
            "Open MPI",
            node=env.get("HOSTNAME") or os.uname().nodename,
            local_rank=int(env["OMPI_COMM_WORLD_LOCAL_RANK"]),
            local_size=int(env["OMPI_COMM_WORLD_LOCAL_SIZE"]),
            gpus_on_node=None,
        )
    if all(k in env for k in SLURM_VARIABLES):
        on_node = env.get("SLURM_GPUS_ON_NODE")
        return Place(
            "SLURM",
            node=env.get("SLURMD_NODENAME", f"node {env.get('SLURM_NODEID', '?')}"),
            local_rank=int(env["SLURM_LOCALID"]),
            local_size=_tasks_on_this_node(env),
            gpus_on_node=None if on_node is None else int(on_node),
        )
    return None


def _visible(env: Mapping[str, str]) -> str:
    """The GPUs named for this process, by SLURM or by hand (NVIDIA's variable, else AMD's),
    as given; empty where none are named."""
    return env.get("CUDA_VISIBLE_DEVICES") or env.get("ROCR_VISIBLE_DEVICES") or ""


def _tasks_on_this_node(env: Mapping[str, str]) -> int:
    """SLURM_STEP_TASKS_PER_NODE in SLURM's compressed form ("8(x2)", "2,1", "4(x3),2")
    at this node's index SLURM_NODEID."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:  # srun sets both; without them the tasks sharing this node are unknown
        raise ConfigError(
            "SLURM_STEP_TASKS_PER_NODE and SLURM_TASKS_PER_NODE are unset: the tasks on this "
            "node are unknown, so the GPUs each drives cannot be chosen; start the tasks with "
            "srun, or set JAX_LOCAL_DEVICE_IDS"
        )
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise ConfigError(f"SLURM_STEP_TASKS_PER_NODE={spec!r}: expected a form like '8(x2),4'")
        counts += [int(match[1])] * int(match[2] or 1)
    node = int(env.get("SLURM_NODEID", "0"))
    if node >= len(counts):
        raise ConfigError(
            f"SLURM_NODEID={node}, but SLURM_STEP_TASKS_PER_NODE={spec!r} lists {len(counts)} nodes"
        )
    return counts[node]


def _gpus_in_machine() -> int | None:
    try:
        return len(list(NVIDIA_GPUS.iterdir())) or None
    except OSError:
        return None

"""Joining JAX's multi-controller runtime (`--distributed`): which process this is, and which
of the machine's GPUs it drives.

Under SLURM, `jax.distributed.initialize()` finds the coordinator, the process count and this
process's id itself, and it also picks the GPUs: the SLURM_LOCALID-th GPU the task sees, one
each (JAX's clusters/cluster.py), which is right only for a task per GPU with every task seeing
all of them. SLURM runs other layouts, and for them JAX's pick is wrong without a word:

- one task per node with the node's 8 GPUs (launch/slurm.sbatch): GPU 0 alone, 7 idle;
- `--gpus-per-task=1`: each task sees one GPU, its ordinal 0, and JAX asks for ordinal
  SLURM_LOCALID, which does not exist (jax-ml/jax#23452, MaxText #865 and #3433).

So jaxlm reads what SLURM gave the task and passes `local_device_ids` itself: a task that sees
GPUs of its own drives all of them; tasks that see the same GPUs split them evenly in
SLURM_LOCALID order. The variables and their values are SLURM's own, recorded from srun
(SLURM 22.05) for each layout in tests/test_distributed.py.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

from jaxlm.config import ConfigError

NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one entry per GPU the driver sees


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
        return
    # TPU pod, SLURM, Open MPI: JAX finds the rest in the environment
    gpus = slurm_local_device_ids(env, _gpus_in_machine())
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout, local_device_ids=gpus)
    if gpus is not None:
        logging.info(
            "SLURM task %s (node %s, local id %s): GPUs %s of the ones it sees (%s)",
            env["SLURM_PROCID"],
            env.get("SLURMD_NODENAME", env.get("SLURM_NODEID")),
            env["SLURM_LOCALID"],
            ",".join(map(str, gpus)),
            _visible(env) or f"all {_gpus_in_machine()} of the machine",
        )


def slurm_local_device_ids(env: Mapping[str, str], gpus_in_machine: int | None) -> list[int] | None:
    """The ordinals of the GPUs this SLURM task drives (CUDA numbers the GPUs a process sees
    0, 1, ... whatever CUDA_VISIBLE_DEVICES names), or None to leave the choice to JAX: not
    under SLURM, JAX_LOCAL_DEVICE_IDS given, or no GPU known (a CPU or TPU host).

    gpus_in_machine counts the machine's GPUs when SLURM does not name them (no GPU gres, or
    --gpu-bind=none): the task then sees all of them."""
    if not all(k in env for k in ("SLURM_JOB_ID", "SLURM_LOCALID", "SLURM_STEP_NODELIST")):
        return None
    if env.get("JAX_LOCAL_DEVICE_IDS"):
        return None
    visible = _visible(env)
    seen = len(visible.split(",")) if visible else gpus_in_machine
    if not seen:
        return None
    local_id = int(env["SLURM_LOCALID"])
    tasks = _tasks_on_this_node(env)
    on_node = env.get("SLURM_GPUS_ON_NODE")
    if tasks == 1 or (on_node is not None and seen < int(on_node)):
        return list(range(seen))  # the task's own GPUs (one task, or SLURM bound each its share)
    if seen % tasks:
        raise ConfigError(
            f"SLURM runs {tasks} tasks on node {env.get('SLURMD_NODENAME', '?')}, which share "
            f"the {seen} GPUs they see ({visible or 'all of the machine'}), and {seen} does not "
            "split evenly among them: run one task per node (launch/slurm.sbatch) or one per "
            "GPU, or set JAX_LOCAL_DEVICE_IDS"
        )
    each = seen // tasks
    return list(range(local_id * each, (local_id + 1) * each))


def _visible(env: Mapping[str, str]) -> str:
    """The GPUs SLURM named for this task (NVIDIA's variable, else AMD's), as given."""
    return env.get("CUDA_VISIBLE_DEVICES") or env.get("ROCR_VISIBLE_DEVICES") or ""


def _tasks_on_this_node(env: Mapping[str, str]) -> int:
    """SLURM_STEP_TASKS_PER_NODE in SLURM's compressed form ("8(x2)", "2,1", "4(x3),2")
    at this node's index SLURM_NODEID."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return 1
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

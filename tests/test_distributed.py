"""Which GPUs a process drives under SLURM or Open MPI: jaxlm's choice from the variables the
launcher set for each layout (recorded from srun and mpirun by
tests/golden/record_launcher_env.sh), and two processes joining under the variables of
launch/slurm.sbatch's layout."""

import json
import os
import subprocess
import sys

import portpicker
import pytest
from conftest import ROOT

from jaxlm.config import ConfigError
from jaxlm.distributed import local_device_ids

LAYOUTS = json.loads((ROOT / "tests/golden/launcher_env.json").read_text())
EIGHT = list(range(8))

# layout -> the GPU ordinals each task drives, in SLURM_PROCID order
EXPECTED = {
    "task_per_node": [EIGHT, EIGHT],  # launch/slurm.sbatch: all 8 (JAX alone: GPU 0)
    "task_per_gpu": [[i] for i in range(8)] * 2,  # JAX's own layout: the LOCALID-th
    "gpus_per_task_1": [[0]] * 4,  # each sees one GPU, ordinal 0 (JAX alone: 1, 2, 3 missing)
    "gpus_per_task_3": [[0, 1, 2]] * 2,
    "part_of_a_node": [[0, 1]],  # 2 of the node's 8
    # two tasks on n1 share it, one has n2 (then refused: processes must hold as many devices)
    "uneven": [[0, 1, 2, 3], [4, 5, 6, 7], EIGHT],
    # mpirun names no GPUs: a process sees the machine's 8
    "mpirun_one": [EIGHT],  # JAX alone: GPU 0
    "mpirun_two": [[0, 1, 2, 3], [4, 5, 6, 7]],
    "mpirun_two_given_four": [[0, 1], [2, 3]],  # -x CUDA_VISIBLE_DEVICES=4,5,6,7
}


@pytest.mark.parametrize("layout", sorted(EXPECTED))
def test_each_process_drives_the_gpus_its_launcher_gave_it(layout):
    tasks = LAYOUTS[layout]["tasks"]
    assert [local_device_ids(env, gpus_in_machine=8) for env in tasks] == EXPECTED[layout]


def test_jax_alone_gives_a_task_per_node_one_gpu():
    """Why jaxlm chooses: JAX's SLURM detection gives launch/slurm.sbatch's task GPU 0 only
    (should JAX change that, this test says jaxlm's choice may be JAX's own)."""
    from jax._src.clusters import ClusterEnv

    env = LAYOUTS["task_per_node"]["tasks"][1]
    saved = dict(os.environ)
    try:
        os.environ.update(env)
        *_, local_device_ids = ClusterEnv.auto_detect_unset_distributed_params(
            None, None, None, None, None, 10
        )
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert local_device_ids == [0]


def test_tasks_that_cannot_share_their_gpus_evenly_are_refused():
    env = LAYOUTS["three_share_eight"]["tasks"][0]
    with pytest.raises(ConfigError, match="SLURM runs 3 processes on n1, which share the 8 GPUs"):
        local_device_ids(env, gpus_in_machine=8)


def test_outside_slurm_or_without_gpus_jax_chooses():
    env = LAYOUTS["task_per_node"]["tasks"][0]
    assert local_device_ids({}, gpus_in_machine=8) is None
    outside_srun = {k: v for k, v in env.items() if k != "SLURM_STEP_NODELIST"}  # salloc's shell
    assert local_device_ids(outside_srun, gpus_in_machine=8) is None  # JAX finds no SLURM either
    assert local_device_ids({**env, "JAX_LOCAL_DEVICE_IDS": "3"}, 8) is None
    no_gpus = {k: v for k, v in env.items() if k not in ("CUDA_VISIBLE_DEVICES",)}
    assert local_device_ids(no_gpus, gpus_in_machine=None) is None  # a CPU or TPU host
    assert local_device_ids(no_gpus, gpus_in_machine=4) == [0, 1, 2, 3]  # no gres
    unknown = {k: v for k, v in env.items() if not k.endswith("TASKS_PER_NODE")}
    with pytest.raises(ConfigError, match="SLURM_STEP_TASKS_PER_NODE and SLURM_TASKS_PER_NODE"):
        local_device_ids(unknown, gpus_in_machine=8)
    assert local_device_ids({**unknown, "JAX_LOCAL_DEVICE_IDS": "3"}, 8) is None
    bad = {**env, "SLURM_STEP_TASKS_PER_NODE": "two"}
    with pytest.raises(ConfigError, match="SLURM_STEP_TASKS_PER_NODE='two'"):
        local_device_ids(bad, gpus_in_machine=8)


def run_together(argv: list[str], envs: list[dict]) -> tuple[list[int], list[str]]:
    """The processes of one job, one per environment, started at once: their exit statuses
    and outputs."""
    procs = [
        subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for env in envs
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    return [p.returncode for p in procs], outputs


JOIN = """
import logging, os, jax, numpy as np
logging.basicConfig(level=logging.INFO)
from jax._src import xla_bridge
from jax.experimental import multihost_utils
from jaxlm import distributed
distributed.init(30)
total = multihost_utils.process_allgather(np.array([jax.process_index() + 1])).sum()
print(jax.process_index(), jax.process_count(), total, xla_bridge.CUDA_VISIBLE_DEVICES.value)
"""


def test_two_tasks_join_under_the_variables_of_launch_slurm_sbatch():
    """The processes find each other through JAX's SLURM detection (coordinator, count, id
    from SLURM's variables), and JAX is told to use all 8 GPUs of each task's node (the flag
    its GPU backend reads; on this CPU it changes nothing else)."""
    port = str(portpicker.pick_unused_port())
    envs = []
    for env in LAYOUTS["task_per_node"]["tasks"]:
        penv = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORD", "SLURM"))}
        penv.update(env, SLURM_STEP_NODELIST="localhost", JAX_COORDINATOR_PORT=port)
        envs.append(penv | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    statuses, outputs = run_together([sys.executable, "-c", JOIN], envs)
    assert statuses == [0, 0], outputs
    lines = [out.strip().splitlines()[-1] for out in outputs]
    assert lines == ["0 2 3 0,1,2,3,4,5,6,7", "1 2 3 0,1,2,3,4,5,6,7"], outputs
    assert "SLURM: process 1 on n2 (local rank 0 of 1): GPUs 0,1,2,3,4,5,6,7" in outputs[1]


def test_processes_with_different_device_counts_are_refused_before_training(tmp_path):
    """A process with 4 devices beside one with 2 (SLURM's 'uneven' layout gives 4, 4 and 8
    GPUs): both stop with the counts named, where the first gather failed deep in JAX."""
    port = portpicker.pick_unused_port()
    cli = "import sys; from jaxlm import cli; sys.exit(cli.main(sys.argv[1:]))"
    args = ["train", str(ROOT / "configs/gpt.py:tiny"), "--workdir", str(tmp_path / "run")]
    envs = [
        dict(
            os.environ,
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        )
        for i, devices in enumerate((4, 2))
    ]
    argv = [sys.executable, "-c", cli, *args, "train.batch_size=12", "--distributed"]
    statuses, outputs = run_together(argv, envs)
    assert statuses == [2, 2], outputs
    for out in outputs:
        assert "different numbers of devices (process 0: 4, process 1: 2)" in out
        assert "Traceback" not in out
    assert not (tmp_path / "run").exists()

#!/usr/bin/env bash
# Records the variables SLURM's srun and Open MPI's mpirun give each process in the layouts
# tests/test_distributed.py checks, as tests/golden/launcher_env.json. Needs a SLURM cluster
# with two nodes of 8 GPUs (gres) and Open MPI: recorded on SLURM 22.05 (Debian's slurm-wlm)
# with two slurmd on one machine (n1, n2) and gres.conf `Name=gpu File=/tmp/fakegpu/nvidia[0-7]`
# (character devices made with mknod; DEVELOPERS.md), and Open MPI 4.1 (Debian's openmpi-bin).
set -euo pipefail
keys='OMPI_MCA_orte_hnp_uri|OMPI_COMM_WORLD_RANK|OMPI_COMM_WORLD_SIZE|OMPI_COMM_WORLD_LOCAL_RANK|OMPI_COMM_WORLD_LOCAL_SIZE|SLURM_JOB_ID|SLURM_PROCID|SLURM_LOCALID|SLURM_NODEID|SLURMD_NODENAME|SLURM_NTASKS|SLURM_STEP_NODELIST|SLURM_STEP_TASKS_PER_NODE|SLURM_TASKS_PER_NODE|SLURM_GPUS_ON_NODE|CUDA_VISIBLE_DEVICES'
task='python3 -c "import json, os, re, sys; print(json.dumps({k: v for k, v in os.environ.items() if re.fullmatch(sys.argv[1], k)}))" '"'$keys'"
record() {  # name, launcher and its options...
  local name=$1; shift
  "$@" bash -c "$task" | python3 -c "import json, sys; tasks = sorted((json.loads(l) for l in sys.stdin), key=lambda e: int(e.get('SLURM_PROCID') or e['OMPI_COMM_WORLD_RANK'])); print(json.dumps({'$name': {'command': '$*', 'tasks': tasks}}))"
}
{
  record task_per_node srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8  # launch/slurm.sbatch
  record task_per_gpu srun --nodes=2 --ntasks-per-node=8 --gpus-per-node=8
  record gpus_per_task_1 srun --nodes=1 --ntasks=4 --gpus-per-task=1
  record gpus_per_task_3 srun --nodes=1 --ntasks=2 --gpus-per-task=3
  record part_of_a_node srun --nodes=1 --ntasks=1 --gpus-per-node=2 --exclusive=user
  record uneven srun --nodes=2 --ntasks=3 --gpus-per-node=8
  record three_share_eight srun --nodes=1 --ntasks=3 --gpus-per-node=8
  mpirun="mpirun --allow-run-as-root --oversubscribe"
  record mpirun_one $mpirun -np 1
  record mpirun_two $mpirun -np 2
  record mpirun_two_given_four $mpirun -np 2 -x CUDA_VISIBLE_DEVICES=4,5,6,7
} | python3 -c "import json, sys; d = {}; [d.update(json.loads(l)) for l in sys.stdin]; print(json.dumps(d, indent=1))" > "$(dirname "$0")/launcher_env.json"

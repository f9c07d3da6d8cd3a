#!/usr/bin/env bash
# Records the variables SLURM gives each task in the layouts tests/test_distributed.py checks,
# as tests/golden/slurm_env.json. Needs a SLURM cluster with two nodes of 8 GPUs (gres):
# recorded on SLURM 22.05 (Debian's slurm-wlm) with two slurmd on one machine (n1, n2) and
# gres.conf `Name=gpu File=/tmp/fakegpu/nvidia[0-7]` (character devices made with mknod).
set -euo pipefail
keys='SLURM_JOB_ID|SLURM_PROCID|SLURM_LOCALID|SLURM_NODEID|SLURMD_NODENAME|SLURM_NTASKS|SLURM_STEP_NODELIST|SLURM_STEP_TASKS_PER_NODE|SLURM_TASKS_PER_NODE|SLURM_GPUS_ON_NODE|CUDA_VISIBLE_DEVICES'
task='python3 -c "import json, os, re, sys; print(json.dumps({k: v for k, v in os.environ.items() if re.fullmatch(sys.argv[1], k)}))" '"'$keys'"
record() {  # name, srun options...
  local name=$1; shift
  srun "$@" bash -c "$task" | python3 -c "import json, sys; tasks = sorted((json.loads(l) for l in sys.stdin), key=lambda e: int(e['SLURM_PROCID'])); print(json.dumps({'$name': {'srun': '$*', 'tasks': tasks}}))"
}
{
  record task_per_node --nodes=2 --ntasks-per-node=1 --gpus-per-node=8  # launch/slurm.sbatch
  record task_per_gpu --nodes=2 --ntasks-per-node=8 --gpus-per-node=8
  record gpus_per_task_1 --nodes=1 --ntasks=4 --gpus-per-task=1
  record gpus_per_task_3 --nodes=1 --ntasks=2 --gpus-per-task=3
  record part_of_a_node --nodes=1 --ntasks=1 --gpus-per-node=2 --exclusive=user
  record uneven --nodes=2 --ntasks=3 --gpus-per-node=8
  record three_share_eight --nodes=1 --ntasks=3 --gpus-per-node=8
} | python3 -c "import json, sys; d = {}; [d.update(json.loads(l)) for l in sys.stdin]; print(json.dumps(d, indent=1))" > "$(dirname "$0")/slurm_env.json"

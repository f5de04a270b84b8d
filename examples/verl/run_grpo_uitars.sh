#!/usr/bin/env bash
# GRPO on UI-TARS-1.5-7B with agentenv's desktops, on one 8-GPU node (examples/verl/README.md).
# Desktops run elsewhere (`agentenv serve-envs` on each desktop machine, listed in agentenv.yaml).
# Not runnable on the CPU development machines: verl's trainer needs GPUs.
#   examples/verl/run_grpo_uitars.sh [hydra overrides...]
set -euo pipefail
cd "$(dirname "$0")/../.."
export DATA=${DATA:-$HOME/data/agentenv}

# 1. the tasks, as verl's RLHFDataset reads them (each row carries its agentenv task)
agentenv verl-dataset --source "${TASKS:-builtin}" --out "$DATA/train.parquet"
agentenv verl-dataset --source "${VAL_TASKS:-builtin}" --out "$DATA/val.parquet"

# 2. verl's trainer; every rollout is an agentenv trajectory on a real desktop
python3 -m verl.trainer.main_ppo --config-path="$PWD/examples/verl" --config-name=grpo_uitars "$@"

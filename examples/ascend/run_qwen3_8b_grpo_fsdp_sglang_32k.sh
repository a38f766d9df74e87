#!/usr/bin/env bash
# Qwen3-8B GRPO on DAPO-Math, 32k responses, FSDP + Ulysses SP 4 + SGLang rollout, 8 NPUs.
# Layout: FSDP DP 8 × Ulysses SP 4, two rollout replicas of TP 4, 16 prompts × 5 = 80 samples per step.
# verl's script set WORKSPACE_HOME=$pwd (lower case, always empty), so its paths began at /; fixed here.
# Check it first without devices: ASCEND_RL_COMMAND=plan bash run_qwen3_8b_grpo_fsdp_sglang_32k.sh
set -euo pipefail
WORKSPACE_HOME=${WORKSPACE_HOME:-$PWD}
MODEL_PATH=${MODEL_PATH:-$WORKSPACE_HOME/models/Qwen3-8B}
TRAIN_FILE=${TRAIN_FILE:-$WORKSPACE_HOME/data/dapo-math-17k.parquet}
TEST_FILE=${TEST_FILE:-$WORKSPACE_HOME/data/aime-2024.parquet}
CKPTS_DIR=${CKPTS_DIR:-$WORKSPACE_HOME/ckpts/qwen3_8b_grpo_32k}

export HCCL_CONNECT_TIMEOUT=1500
export HCCL_HOST_SOCKET_PORT_RANGE=60000-60050
export HCCL_NPU_SOCKET_PORT_RANGE=61000-61050
export RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES=1
export ASCEND_RT_VISIBLE_DEVICES=${ASCEND_RT_VISIBLE_DEVICES:-0,1,2,3,4,5,6,7}

# shellcheck disable=SC2086  # ASCEND_RL_COMMAND may carry options ("plan --json")
ascend-rl ${ASCEND_RL_COMMAND:-train} \
    algorithm.adv_estimator=grpo \
    data.train_files="$TRAIN_FILE" data.val_files="$TEST_FILE" \
    data.train_batch_size=16 data.max_prompt_length=2048 data.max_response_length=32768 \
    data.filter_overlong_prompts=False data.truncation='error' \
    actor_rollout_ref.model.path="$MODEL_PATH" actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.model.enable_gradient_checkpointing=True \
    actor_rollout_ref.actor.optim.lr=1e-6 actor_rollout_ref.actor.ppo_mini_batch_size=16 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1 actor_rollout_ref.actor.use_kl_loss=True \
    actor_rollout_ref.actor.entropy_coeff=0 actor_rollout_ref.actor.kl_loss_coef=0.001 \
    actor_rollout_ref.actor.kl_loss_type=low_var_kl actor_rollout_ref.actor.use_torch_compile=False \
    actor_rollout_ref.actor.fsdp_config.param_offload=True actor_rollout_ref.actor.fsdp_config.optimizer_offload=True \
    actor_rollout_ref.actor.ulysses_sequence_parallel_size=4 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=4 actor_rollout_ref.rollout.name=sglang \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.3 actor_rollout_ref.rollout.n=5 \
    +actor_rollout_ref.rollout.engine_kwargs.sglang.attention_backend="ascend" \
    actor_rollout_ref.rollout.enable_chunked_prefill=False \
    actor_rollout_ref.ref.fsdp_config.param_offload=True actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=1 \
    actor_rollout_ref.ref.ulysses_sequence_parallel_size=4 actor_rollout_ref.nccl_timeout=3600 \
    algorithm.use_kl_in_reward=False trainer.critic_warmup=0 trainer.logger=console \
    trainer.project_name=qwen3_8b_grpo trainer.experiment_name=fsdp_sglang_32k \
    trainer.val_before_train=False trainer.n_gpus_per_node=8 trainer.nnodes=1 trainer.device='npu' \
    trainer.save_freq=1000 trainer.test_freq=10000 trainer.total_epochs=5 trainer.default_local_dir="$CKPTS_DIR" \
    "$@"

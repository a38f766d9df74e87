#!/usr/bin/env bash
# Qwen2.5-32B GRPO, FSDP training + SGLang rollout, 2 nodes × Atlas 900 A2 (8 NPUs each).
# Layout: FSDP DP 16, 4 rollout replicas of TP 4, 32 prompts × 8 = 256 samples per step.
# Start Ray on both nodes first (docs/ascend/quickstart.md); run this on the head node.
# Check it first without devices: ASCEND_RL_COMMAND=plan bash run_qwen2_5_32b_grpo_fsdp_sglang_a2_2nodes.sh
set -euo pipefail
WORKSPACE_HOME=${WORKSPACE_HOME:-$PWD}
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2.5-32B}
TRAIN_FILE=${TRAIN_FILE:-$WORKSPACE_HOME/data/deepscaler/train.parquet}
TEST_FILE=${TEST_FILE:-$WORKSPACE_HOME/data/deepscaler/test.parquet}
REWARD_FILE=${REWARD_FILE:-$WORKSPACE_HOME/deepscaler_reward.py}
CKPTS_DIR=${CKPTS_DIR:-$WORKSPACE_HOME/ckpts/qwen2_5_32b_grpo}

export HCCL_CONNECT_TIMEOUT=1500
export HCCL_HOST_SOCKET_PORT_RANGE=60000-60050
export HCCL_NPU_SOCKET_PORT_RANGE=61000-61050
export RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES=1
export ASCEND_RT_VISIBLE_DEVICES=${ASCEND_RT_VISIBLE_DEVICES:-0,1,2,3,4,5,6,7}
export DISABLE_L2_CACHE=1
export TASK_QUEUE_ENABLE=1

# shellcheck disable=SC2086  # ASCEND_RL_COMMAND may carry options ("plan --json")
ascend-rl ${ASCEND_RL_COMMAND:-train} \
    reward.custom_reward_function.path="$REWARD_FILE" reward.custom_reward_function.name=compute_score \
    data.train_files="$TRAIN_FILE" data.val_files="$TEST_FILE" \
    data.train_batch_size=32 data.max_prompt_length=2048 data.max_response_length=8192 \
    data.filter_overlong_prompts=False data.truncation='left' \
    actor_rollout_ref.model.path="$MODEL_PATH" actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.model.enable_gradient_checkpointing=True \
    algorithm.adv_estimator=grpo algorithm.use_kl_in_reward=False \
    actor_rollout_ref.actor.use_torch_compile=False actor_rollout_ref.actor.use_dynamic_bsz=False \
    actor_rollout_ref.actor.use_kl_loss=True actor_rollout_ref.actor.kl_loss_type=low_var_kl \
    actor_rollout_ref.actor.kl_loss_coef=0.001 actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1 actor_rollout_ref.actor.ppo_mini_batch_size=32 \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.fsdp_config.param_offload=True actor_rollout_ref.actor.fsdp_config.optimizer_offload=True \
    actor_rollout_ref.ref.use_torch_compile=False actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=1 \
    actor_rollout_ref.ref.log_prob_use_dynamic_bsz=False actor_rollout_ref.ref.fsdp_config.param_offload=True \
    actor_rollout_ref.rollout.name=sglang \
    +actor_rollout_ref.rollout.engine_kwargs.sglang.attention_backend="ascend" \
    actor_rollout_ref.rollout.n=8 actor_rollout_ref.rollout.top_p=1.0 actor_rollout_ref.rollout.top_k=-1 \
    actor_rollout_ref.rollout.temperature=1.0 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1 \
    actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=False \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.5 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=4 actor_rollout_ref.rollout.data_parallel_size=1 \
    actor_rollout_ref.rollout.expert_parallel_size=1 \
    actor_rollout_ref.rollout.enable_chunked_prefill=False actor_rollout_ref.rollout.multi_stage_wake_up=True \
    actor_rollout_ref.rollout.val_kwargs.n=1 actor_rollout_ref.rollout.val_kwargs.do_sample=True \
    actor_rollout_ref.rollout.val_kwargs.top_p=1.0 actor_rollout_ref.rollout.val_kwargs.top_k=-1 \
    actor_rollout_ref.rollout.val_kwargs.temperature=1.0 \
    actor_rollout_ref.nccl_timeout=1800 \
    trainer.logger='["console"]' trainer.project_name=qwen2_5_32b_grpo trainer.experiment_name=fsdp_sglang_a2 \
    trainer.nnodes=2 trainer.n_gpus_per_node=8 trainer.device='npu' trainer.total_epochs=5 \
    trainer.val_before_train=False trainer.test_freq=-1 trainer.save_freq=100 \
    trainer.default_local_dir="$CKPTS_DIR" trainer.critic_warmup=0 \
    "$@"

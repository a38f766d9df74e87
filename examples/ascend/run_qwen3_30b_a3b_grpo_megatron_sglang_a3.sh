#!/usr/bin/env bash
# Qwen3-30B-A3B GRPO, Megatron training + SGLang rollout, 1 node × Atlas 800T A3 (16 NPU dies).
# Layout: train DP 4 (TP 4), 4 rollout replicas of TP 4, 16 prompts × 8 = 128 samples per step.
# Check it first without devices: ASCEND_RL_COMMAND=plan bash run_qwen3_30b_a3b_grpo_megatron_sglang_a3.sh
set -euo pipefail
WORKSPACE_HOME=${WORKSPACE_HOME:-$PWD}
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen3-30B-A3B}
MCORE_PATH=${MCORE_PATH:-Qwen/Qwen3-30B-A3B-mcore}
TRAIN_FILE=${TRAIN_FILE:-$WORKSPACE_HOME/data/dapo-math-17k.parquet}
TEST_FILE=${TEST_FILE:-$WORKSPACE_HOME/data/aime-2024.parquet}
CKPTS_DIR=${CKPTS_DIR:-$WORKSPACE_HOME/ckpts/qwen3_30b_grpo}
PROFILE_DIR=${PROFILE_DIR:-$WORKSPACE_HOME/profile}

export HCCL_CONNECT_TIMEOUT=1500
export HCCL_HOST_SOCKET_PORT_RANGE=60000-60050
export HCCL_NPU_SOCKET_PORT_RANGE=61000-61050
export RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES=1
export ASCEND_RT_VISIBLE_DEVICES=${ASCEND_RT_VISIBLE_DEVICES:-0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15}
export DISABLE_L2_CACHE=1
export TASK_QUEUE_ENABLE=1

# shellcheck disable=SC2086  # ASCEND_RL_COMMAND may carry options ("plan --json")
ascend-rl ${ASCEND_RL_COMMAND:-train} \
    data.train_files="$TRAIN_FILE" data.val_files="$TEST_FILE" data.prompt_key=prompt \
    data.train_batch_size=16 data.max_prompt_length=2048 data.max_response_length=8192 \
    data.filter_overlong_prompts=False data.truncation='left' \
    actor_rollout_ref.model.path="$MODEL_PATH" actor_rollout_ref.model.use_remove_padding=True \
    algorithm.adv_estimator=grpo algorithm.use_kl_in_reward=False algorithm.kl_ctrl.kl_coef=0.0 \
    actor_rollout_ref.actor.strategy=megatron \
    actor_rollout_ref.actor.use_torch_compile=False actor_rollout_ref.actor.use_dynamic_bsz=False \
    actor_rollout_ref.actor.use_kl_loss=True actor_rollout_ref.actor.kl_loss_coef=0.001 \
    actor_rollout_ref.actor.entropy_coeff=0 actor_rollout_ref.actor.ppo_epochs=1 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1 actor_rollout_ref.actor.ppo_max_token_len_per_gpu=10240 \
    actor_rollout_ref.actor.ppo_mini_batch_size=16 actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.megatron.tensor_model_parallel_size=4 \
    actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=1 \
    actor_rollout_ref.actor.megatron.context_parallel_size=1 \
    actor_rollout_ref.actor.megatron.expert_model_parallel_size=4 \
    actor_rollout_ref.actor.megatron.expert_tensor_parallel_size=4 \
    actor_rollout_ref.actor.megatron.param_offload=True actor_rollout_ref.actor.megatron.optimizer_offload=True \
    actor_rollout_ref.actor.megatron.grad_offload=True \
    actor_rollout_ref.actor.megatron.dist_checkpointing_path="$MCORE_PATH" \
    actor_rollout_ref.actor.megatron.use_dist_checkpointing=True actor_rollout_ref.actor.megatron.use_mbridge=False \
    +actor_rollout_ref.actor.megatron.override_transformer_config.use_flash_attn=True \
    +actor_rollout_ref.actor.megatron.override_transformer_config.recompute_method=uniform \
    +actor_rollout_ref.actor.megatron.override_transformer_config.recompute_granularity=full \
    +actor_rollout_ref.actor.megatron.override_transformer_config.recompute_num_layers=1 \
    actor_rollout_ref.ref.use_torch_compile=False actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=1 \
    actor_rollout_ref.ref.log_prob_use_dynamic_bsz=False actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=10240 \
    actor_rollout_ref.ref.megatron.tensor_model_parallel_size=4 \
    actor_rollout_ref.ref.megatron.pipeline_model_parallel_size=1 \
    actor_rollout_ref.ref.megatron.context_parallel_size=1 \
    actor_rollout_ref.ref.megatron.expert_model_parallel_size=4 \
    actor_rollout_ref.ref.megatron.expert_tensor_parallel_size=4 \
    actor_rollout_ref.ref.megatron.param_offload=True \
    actor_rollout_ref.ref.megatron.dist_checkpointing_path="$MCORE_PATH" \
    actor_rollout_ref.ref.megatron.use_dist_checkpointing=True actor_rollout_ref.ref.megatron.use_mbridge=False \
    actor_rollout_ref.rollout.name=sglang \
    +actor_rollout_ref.rollout.engine_kwargs.sglang.attention_backend="ascend" \
    actor_rollout_ref.rollout.n=8 actor_rollout_ref.rollout.top_p=1.0 actor_rollout_ref.rollout.top_k=-1 \
    actor_rollout_ref.rollout.temperature=1.0 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1 \
    actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=False \
    actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=10240 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.5 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=4 actor_rollout_ref.rollout.data_parallel_size=1 \
    actor_rollout_ref.rollout.expert_parallel_size=1 \
    +actor_rollout_ref.rollout.engine_kwargs.sglang.enable_dp_attention=False \
    +actor_rollout_ref.rollout.engine_kwargs.sglang.chunked_prefill_size=-1 \
    actor_rollout_ref.rollout.enforce_eager=False \
    actor_rollout_ref.rollout.val_kwargs.n=1 actor_rollout_ref.rollout.val_kwargs.do_sample=True \
    actor_rollout_ref.rollout.val_kwargs.top_p=1.0 actor_rollout_ref.rollout.val_kwargs.top_k=-1 \
    actor_rollout_ref.rollout.val_kwargs.temperature=1.0 \
    trainer.logger='["console"]' trainer.project_name=qwen3_30b_grpo trainer.experiment_name=megatron_sglang_a3 \
    trainer.nnodes=1 trainer.n_gpus_per_node=16 trainer.device='npu' trainer.total_epochs=15 \
    trainer.val_before_train=False trainer.test_freq=-1 trainer.save_freq=-1 trainer.default_local_dir="$CKPTS_DIR" \
    global_profiler.tool=npu global_profiler.steps=null global_profiler.save_path="$PROFILE_DIR" \
    actor_rollout_ref.actor.profiler.enable=True actor_rollout_ref.actor.profiler.ranks="[0]" \
    actor_rollout_ref.actor.profiler.all_ranks=False \
    actor_rollout_ref.actor.profiler.tool_config.npu.discrete=True \
    actor_rollout_ref.actor.profiler.tool_config.npu.contents="['npu','cpu']" \
    actor_rollout_ref.actor.profiler.tool_config.npu.level=level0 \
    actor_rollout_ref.actor.profiler.tool_config.npu.analysis=True \
    actor_rollout_ref.rollout.profiler.enable=True actor_rollout_ref.rollout.profiler.ranks="[0]" \
    actor_rollout_ref.rollout.profiler.all_ranks=False \
    "$@"

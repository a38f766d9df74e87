"""The Megatron-core training engine (`actor.strategy=megatron`, issue 19). megatron-core (the `megatron` extra,
pinned to 0.16.1) is imported only inside the functions that need it: the package, `plan` and the converter work
without it.

- `arch`: the shapes and decoder variant of an HF config: Qwen2/Qwen2.5, Qwen3, Llama, Qwen3-MoE.
- `convert`: our own HF ↔ Megatron state-dict converter, exact both ways, per (TP, EP, ETP, PP) rank. Our own, not
  mbridge: mbridge pins transformers<5 and knows only Transformer Engine parameter names.
- `model`: `GPTModel` on the local layer spec (no Transformer Engine) from the HF config, Megatron's process
  groups (TP with or without sequence parallelism, PP, EP, ETP), HF weights per rank.
- `gather`: the sharded model back in HF names, whole tensors a layer at a time (weight sync, HF export).
- `pipeline`: micro-batches through Megatron's schedule (forward and backward across pipeline stages); what
  the last stage computes from the logits shared with the other stages.
- `engine`, `forward`, `logprobs`, `actor`: the actor and reference behind the FSDP actor's interface, with its
  losses: Megatron's DDP, optimizer (distributed or not) and LR schedule; left-aligned rows for Megatron's RoPE;
  vocab-parallel log-probs and entropy.
- `checkpoint`: dist checkpoints in verl's layout (weights for `dist_checkpointing_path`, the run's checkpoints).
- `trained`: what the actor and the critic share: DDP, optimizer and schedule, offload, the clipped step, dist
  checkpoints.
- `critic`: PPO's critic (`critic.strategy=megatron`) in the actor's workers, on its layout: a value head in place
  of the vocabulary projection, the FSDP critic's values and clipped value-loss update.
- `adaptors`: what each device kind needs before Megatron is built: `cpu_patches` (Megatron's CUDA-isms made the
  CPU's) on a CPU, MindSpeed's adaptor and `repatch` on an Ascend NPU, nothing on CUDA.
- `offload`: weights, gradients and optimizer state in host memory between the phases that use them.

Tested on CPU: the 30B recipe's twin at TP 2 × EP 2 on 4 processes equals one process within 1e-7 over two
GRPO steps; one Megatron rank makes the FSDP actor's update within 1e-4; with every offload switch on, the same
run exactly. On accelerators built but not yet run on one (tests/test_cuda_megatron.py is the prepared check).

Not built yet: virtual pipeline and context parallelism, Transformer Engine's layer spec, a critic from a
converted dist checkpoint, resuming the run's checkpoint at EP 1 from EP > 1 (the MoE's chained optimizer).
"""

import warnings

# Megatron-core warns at import that it falls back to PyTorch where neither Transformer Engine nor Apex is
# installed: the local layer spec this engine builds is that fallback, so the notice says nothing to a user.
warnings.filterwarnings("ignore", message=r"(Transformer Engine and )?Apex (is|are) not installed",
                        category=UserWarning)
# megatron-core 0.16 calls the collectives torch 2.13 renamed (`*_single`); torch says so on every call.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                        r"deprecated", category=FutureWarning)

"""The Megatron-core training engine (`actor.strategy=megatron`, issue 19), being built in slices. megatron-core
(the `megatron` extra, pinned to 0.16.1) is imported only inside the functions that need it: the package, `plan`
and the converter work without it.

Built (first slice):
- `arch`: the shapes and decoder variant of an HF config: Qwen2/Qwen2.5 (q/k/v biases), Qwen3 (q/k norms),
  Llama, Qwen3-MoE (experts only, no shared experts or dense layers); anything else raises NotImplementedError.
- `convert`: our own HF ↔ Megatron state-dict converter, exact both ways, whole or split per TP rank (fused
  per-group QKV, [gate; up] fc1, vocab-parallel embedding/output padded to TP × make_vocab_size_divisible_by,
  experts split over ETP = TP). Our own, not mbridge: mbridge pins transformers<5 and knows only Transformer
  Engine parameter names.
- `model`: `GPTModel` on the local layer spec (no Transformer Engine) from the HF config, Megatron's process
  groups, HF weights loaded per TP rank; TP with or without sequence parallelism, recompute and other fields
  through `override_transformer_config`.
- `logprobs`: log-probs from vocab-parallel logits, the vocabulary's padding masked.
Tested on CPU (tests/test_megatron.py, with `cpu_patches` patching Megatron's CUDA-isms): logits,
loss and gradients equal the HF model's within 1e-5 at TP 1, TP 2, TP 2 + SP (+ recompute), MoE at TP 2 + SP.

Not built yet (later slices of issue 19): the Megatron actor and reference behind the Actor interface
(micro-batches through Megatron's pipeline schedule, the same loss aggregation, entropy, left-padded rows
shifted to start at position 0 as Megatron's RoPE needs), pipeline / virtual pipeline / context / expert
parallelism (NotImplementedError naming them), Megatron's DDP and DistributedOptimizer with `actor.optim.*`,
param/grad/optimizer offload, dist checkpoints (`use_dist_checkpointing`, `dist_checkpointing_path`, the run's
checkpoints), `ascend-rl convert hf-to-mcore`, HF export and the weight sync that gathers TP/EP shards into HF
names (hub names for Qwen3-MoE experts), Transformer Engine's spec on CUDA, MindSpeed's adaptor on Ascend.
"""

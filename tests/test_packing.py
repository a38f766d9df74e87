"""Packed sequences (use_remove_padding) and Ulysses sequence parallelism give what padded batches give."""

import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import transformers
from test_distributed import SETTINGS, assert_same_adam_update, fixed_batch

from ascend_rl.data.collate import position_ids_from_mask
from ascend_rl.data.tiny_model import TinyModelSpec, build_tiny_model
from ascend_rl.distributed.actor_group import ActorGroup
from ascend_rl.distributed.worker_group import ProcessWorkerGroup
from ascend_rl.workers.actor import Actor, ActorSettings, ActorSpec
from ascend_rl.workers.critic import Critic, CriticSettings
from ascend_rl.workers.model_io import ModelForward, response_log_probs, response_values
from ascend_rl.workers.optimizer import OptimSettings
from ascend_rl.workers.packing import SequenceSettings, pack, unpack_responses
from ascend_rl.workers.trained import Batching

A = "actor_rollout_ref"
ROOT = Path(__file__).resolve().parents[1]
PACKED = SequenceSettings(remove_padding=True)
# One optimizer step per update (the whole batch is one mini-batch): two updates are two steps.
ONE_STEP = {**SETTINGS, "ppo_mini_batch_size": 16, "ppo_micro_batch_size_per_gpu": 4, "ppo_epochs": 1}


def uneven_batch(vocab: int, prompt_lengths, response_lengths, seed=0) -> dict:
    """Left-padded prompts and right-padded responses of very different lengths (a response may be empty)."""
    g = torch.Generator().manual_seed(seed)
    p, r = max(prompt_lengths), max(response_lengths)
    plen, rlen = torch.tensor(prompt_lengths), torch.tensor(response_lengths)
    mask = torch.cat([(torch.arange(p)[None] >= p - plen[:, None]), (torch.arange(r)[None] < rlen[:, None])], 1).long()
    ids = torch.randint(1, vocab, mask.shape, generator=g) * mask
    return dict(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), responses=ids[:, p:],
                response_mask=mask[:, p:])


def test_pack_lays_the_real_tokens_end_to_end():
    batch = uneven_batch(50, [2, 1, 3], [2, 0, 1])  # 4 + 1 + 4 real tokens, padded to 12 (a multiple of 4)
    packed = pack(batch["input_ids"], batch["attention_mask"], batch["position_ids"], 2, multiple_of=4)
    real = batch["attention_mask"].bool()
    ids = batch["input_ids"][real].tolist()
    assert packed.input_ids[0].tolist() == ids + [0, 0, 0]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 0, 0, 1, 2, 3, 0, 0, 0]
    assert packed.cu_seqlens.tolist() == [0, 4, 5, 9, 12]  # the padding tail is a sequence of its own
    assert packed.max_length == 4
    # Row 0's response is predicted at its positions 1 and 2, row 2's at position 3 (packed 7); row 1 has none.
    assert packed.predictors.tolist() == [1, 2, 7]
    assert packed.targets.tolist() == [ids[2], ids[3], ids[8]]
    values = torch.tensor([10.0, 11.0, 12.0])
    assert unpack_responses(values, packed).tolist() == [[10.0, 11.0], [0.0, 0.0], [12.0, 0.0]]


def tiny(kind: str):
    """Tiny Qwen2 / Qwen3 / Llama models (GQA: 4 query heads over 2 KV heads), fp32."""
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    config = {"qwen2": transformers.Qwen2Config, "qwen3": partial(transformers.Qwen3Config, head_dim=16),
              "llama": transformers.LlamaConfig}[kind](**common)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


SHORT = ([24, 1, 7, 3, 16, 2], [17, 1, 0, 9, 4, 12])  # every sequence within SHORT_KEYS: one padded batch
LONG = ([100, 1, 7, 100, 16], [60, 1, 0, 60, 12])  # two past it: attention grouped by length (two of 160)


@pytest.mark.parametrize("kind,lengths", [("qwen2", SHORT), ("qwen3", SHORT), ("llama", SHORT), ("qwen3", LONG)])
def test_packed_log_probs_and_gradients_equal_padded(kind, lengths):
    """Prompts of 1-100 tokens, responses of 0-60: log-probs and entropy to 1e-5, gradients to 1e-4 (fp32)."""
    padded_model, packed_model = tiny(kind), tiny(kind)
    packed_model.set_attn_implementation(ModelForward(PACKED).attn_implementation)
    batch = uneven_batch(96, *lengths, seed=1)
    mask = batch["response_mask"].bool()
    a, ea = response_log_probs(padded_model, batch, temperature=0.7, with_entropy=True)
    b, eb = ModelForward(PACKED).log_probs(packed_model, batch, temperature=0.7, with_entropy=True)
    assert torch.allclose(a[mask], b[mask], atol=1e-5) and torch.allclose(ea[mask], eb[mask], atol=1e-5)
    assert not b[~mask].any() and not eb[~mask].any()  # padding is zero, whatever it held
    (a[mask].sum() + ea[mask].sum()).backward()
    (b[mask].sum() + eb[mask].sum()).backward()
    for (name, p), q in zip(padded_model.named_parameters(), packed_model.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4), name


def test_packed_values_equal_padded(tiny_model_dir):
    settings = CriticSettings(Batching(8, None), sequences=PACKED)
    packed = Critic(str(tiny_model_dir), "cpu", settings, OptimSettings(lr=1e-3, total_steps=2))
    padded = Critic(str(tiny_model_dir), "cpu", CriticSettings(Batching(8, None)), OptimSettings(lr=1e-3, total_steps=2))
    batch = uneven_batch(90, [9, 2, 5, 1], [3, 7, 1, 4], seed=2)
    assert torch.allclose(packed.forward.values(packed.model, batch),
                          response_values(padded.model, batch) * batch["response_mask"], atol=1e-5)


@pytest.mark.timeout(300)
def test_packed_actor_makes_the_padded_update(tiny_model_dir):
    optim = OptimSettings(lr=1e-2, total_steps=4)
    padded = Actor(str(tiny_model_dir), "cpu", ActorSettings(**ONE_STEP), optim)
    packed = Actor(str(tiny_model_dir), "cpu", ActorSettings(**ONE_STEP, sequences=PACKED), optim)
    batch = fixed_batch(padded)
    mask = batch["response_mask"]
    assert torch.allclose(packed.log_probs(batch)[0], batch["old_log_probs"] * mask, atol=1e-5)
    for _ in range(2):
        m_padded, m_packed = padded.update(batch), packed.update(batch)
        assert m_packed["actor/pg_loss"] == pytest.approx(m_padded["actor/pg_loss"], abs=1e-5)
        assert m_packed["actor/grad_norm"] == pytest.approx(m_padded["actor/grad_norm"], rel=1e-4)
    for (name, p), q in zip(padded.model.named_parameters(), packed.model.parameters()):
        assert_same_adam_update(q.detach(), p.detach(), optim.lr, 2, name)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world,sp", [(2, 2), (4, 2)])
def test_ulysses_makes_the_update_of_one_process(tiny_model_dir, world, sp):
    """SP 2 on 2 workers, and SP 2 × DP 2 on 4: the pg_loss, grad norm and weights of one process, two steps.
    (lr 1e-3: Adam moves every weight by about lr whatever its gradient's size, so a gradient near zero whose
    last bits differ — another summation order — can move a weight by 3e-5 at lr 1e-2.)"""
    optim = OptimSettings(lr=1e-3, total_steps=4)
    settings = dict(**ONE_STEP, balance_batch=False)
    single = Actor(str(tiny_model_dir), "cpu", ActorSettings(**settings), optim)
    batch = fixed_batch(single)
    group = ActorGroup(partial(ProcessWorkerGroup, world), "cpu",
                       ActorSpec(str(tiny_model_dir), ActorSettings(**settings, sequences=SequenceSettings(True, sp)),
                                 optim))
    try:
        assert torch.allclose(group.log_probs(batch)[0], batch["old_log_probs"] * batch["response_mask"], atol=1e-5)
        for _ in range(2):
            m_single, m_group = single.update(batch), group.update(batch)
            assert m_group["actor/pg_loss"] == pytest.approx(m_single["actor/pg_loss"], abs=1e-5)
            assert m_group["actor/grad_norm"] == pytest.approx(m_single["actor/grad_norm"], rel=1e-5, abs=1e-6)
        weights = dict(group.named_weights())
        for name, p in single.model.named_parameters():
            assert_same_adam_update(weights[name], p.detach(), optim.lr, 2, name)
    finally:
        group.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("script,sp,trains", [("run_qwen3_8b_grpo_fsdp_sglang_1k.sh", 4, True),
                                              ("run_qwen3_8b_grpo_fsdp_sglang_32k.sh", 2, False)])
def test_8b_recipes_cpu_twins_train(tmp_path, task, script, sp, trains):
    """The seed's two Qwen3-8B recipes, run as written with only what a CPU needs changed (the tiny model with 4
    KV heads, arithmetic data, short lengths, 4 CPU workers, the native rollout): packed sequences, Ulysses SP
    `sp` (SP 4 × DP 1; SP 2 × DP 2), gradient checkpointing and the KL loss train two steps. The 32k recipe
    differs from the 1k one only in lengths, micro-batch sizes and files, which the twin overrides or which do not
    change what runs; its SP 2 × DP 2 layout is planned here and trained by test_ulysses_makes_the_update_of_one_process."""
    model = build_tiny_model(tmp_path / "model", TinyModelSpec(num_key_value_heads=4))
    _, data = task
    out = tmp_path / "out"
    twin = [f"{A}.model.path={model}", f"data.train_files={data}/train.parquet", f"data.val_files={data}/test.parquet",
            "data.max_prompt_length=32", "data.max_response_length=8", "data.train_batch_size=4",
            f"{A}.actor.ppo_mini_batch_size=4", "trainer.device=cpu", "trainer.n_gpus_per_node=4",
            f"{A}.rollout.name=native", f"{A}.rollout.tensor_model_parallel_size=1",
            f"{A}.actor.ulysses_sequence_parallel_size={sp}", f"{A}.ref.ulysses_sequence_parallel_size={sp}",
            "trainer.total_training_steps=2", f"trainer.default_local_dir={out}"]
    env = {**os.environ, "WORKSPACE_HOME": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def recipe(command: str):
        return subprocess.run(["bash", str(ROOT / "examples" / "ascend" / script), *twin], capture_output=True,
                              env={**env, "ASCEND_RL_COMMAND": command}, text=True, timeout=540)

    plan = json.loads(recipe("plan --json").stdout)
    assert (plan["layout"]["train"]["ulysses_sp"], plan["layout"]["train"]["data_parallel"]) == (sp, 4 // sp)
    assert plan["errors"] == [] and plan["missing_inputs"] == [] and plan["unsupported"] == []
    assert f"Ulysses groups of {sp}" in plan["workers"]
    if not trains:
        return
    run = recipe("train")
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "actor/grad_norm" in m]
    assert len(steps) == 2
    assert all(math.isfinite(m["actor/grad_norm"]) and math.isfinite(m["actor/pg_loss"]) for m in steps)
    assert all(0 < m["actor/entropy"] < math.log(128) for m in steps)  # a distribution over the vocabulary


def test_packed_bf16_stays_within_bf16_rounding_of_fp32():
    """16-bit compute on CPU takes the matmul path for short sequences: log-probs within bf16's rounding of fp32's,
    and gradients flow."""
    fp32, bf16 = tiny("qwen3"), tiny("qwen3")
    bf16.set_attn_implementation(ModelForward(PACKED).attn_implementation)
    batch = uneven_batch(96, [24, 1, 7, 3, 100], [17, 1, 0, 9, 60], seed=3)  # short and long paths
    mask = batch["response_mask"].bool()
    reference, _ = response_log_probs(fp32, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed, _ = ModelForward(PACKED).log_probs(bf16, batch)
    assert (packed - reference)[mask].abs().max() < 1 / 32
    packed[mask].sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in bf16.parameters())

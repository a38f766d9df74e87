"""Shared prefixes (verl's `actor.use_prefix_grouper`): rows with the same prompt lay it down once in the packed
row, and every result — log-probs, entropy, gradients, the update, on one rank or several — is what padded rows
give."""

from functools import partial

import pytest
import torch
from test_distributed import SETTINGS
from test_packing import tiny
from test_plan import plan_of

from ascend_rl.data.collate import collate
from ascend_rl.distributed.actor_group import ActorGroup
from ascend_rl.distributed.worker_group import ProcessWorkerGroup
from ascend_rl.workers.actor import Actor, ActorSettings, ActorSpec
from ascend_rl.workers.balance import balanced_unit_partition, prompt_units
from ascend_rl.workers.model_io import ModelForward, response_log_probs
from ascend_rl.workers.optimizer import OptimSettings
from ascend_rl.workers.packing import SequenceSettings, pack_shared_prefixes, prompt_groups, unpack_responses

A = "actor_rollout_ref"
SHARED = SequenceSettings(shared_prefix=True)
PACKED = SequenceSettings(remove_padding=True)


def grouped_batch(vocab: int, prompt_lengths, response_lengths, n: int, seed=0, interleave=False):
    """`n` rows per prompt (GRPO's samples), responses of the given lengths (0: empty); `interleave` puts the
    rows of different prompts between each other, as a shuffle would."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, vocab, (length,), generator=g).tolist() for length in prompt_lengths]
    rows = [prompts[i] for i in range(len(prompts)) for _ in range(n)]
    if interleave:
        rows = [prompts[i % len(prompts)] for i in range(len(rows))]
    responses = [torch.randint(1, vocab, (length,), generator=g).tolist() for length in response_lengths]
    return collate(rows, responses, pad_token_id=0)


def test_shared_prefix_layout():
    # prompts A (3 tokens) and B (2) in rows A, B, A, B, A; row 3's response is empty
    prompts = [[11, 12, 13], [14, 15], [11, 12, 13], [14, 15], [11, 12, 13]]
    responses = [[21, 22], [23], [24], [], [25, 26]]
    batch = collate(prompts, responses, pad_token_id=0)
    assert prompt_groups(batch["input_ids"], batch["attention_mask"], 2).tolist() == [0, 1, 0, 1, 0]
    p = pack_shared_prefixes(batch["input_ids"], batch["attention_mask"], batch["position_ids"], 2)
    # A, its responses (rows 0, 2, 4), B, its responses (row 1; row 3 has none)
    assert p.input_ids[0].tolist() == [11, 12, 13, 21, 22, 24, 25, 26, 14, 15, 23]
    assert p.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 3, 4, 0, 1, 2]  # responses continue their prompt
    assert p.cu_seqlens.tolist() == [0, 3, 5, 6, 8, 10, 11]  # attention rows' queries: A, a0, a2, a4, B, b1
    assert p.max_length == 3
    rows = [p.keys.index[a:b].tolist() for a, b in zip(p.keys.cu_seqlens, p.keys.cu_seqlens[1:])]
    assert rows == [[0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 2, 5], [0, 1, 2, 6, 7], [8, 9], [8, 9, 10]]
    assert p.keys.max_length == 5
    # response tokens in row order: A's last position predicts each of A's first tokens, B's last B's
    assert p.predictors.tolist() == [2, 3, 9, 2, 2, 6]
    assert p.targets.tolist() == [21, 22, 23, 24, 25, 26]
    assert unpack_responses(p.targets.float(), p).tolist() == [[21, 22], [23, 0], [24, 0], [0, 0], [25, 26]]


def test_prompt_groups_compare_the_real_tokens_not_the_padding():
    batch = collate([[5, 6], [6], [5, 6], [7, 5, 6], [6]], [[1], [1], [1], [1], [1]], pad_token_id=0)
    assert prompt_groups(batch["input_ids"], batch["attention_mask"], 1).tolist() == [0, 1, 0, 2, 1]


SHORT = ([9, 4, 1, 17], [3, 0, 2, 7, 1, 1, 4, 2, 6, 2, 0, 3, 12, 1, 5, 2], 4)  # every row within SHORT_KEYS
LONG = ([100, 40], [60, 1, 0, 90, 3, 50], 3)  # rows past it: SDPA grouped by (queries, keys) shape


@pytest.mark.parametrize("kind,lengths", [("qwen2", SHORT), ("qwen3", SHORT), ("llama", SHORT), ("qwen3", LONG)])
@pytest.mark.parametrize("interleave", [False, True])
def test_shared_log_probs_and_gradients_equal_padded(kind, lengths, interleave):
    """fp32: log-probs and entropy to 1e-5, gradients to 1e-4 (as the plain packed path), at temperature 0.7."""
    padded_model, shared_model = tiny(kind), tiny(kind)
    forward = ModelForward(SHARED)
    shared_model.set_attn_implementation(forward.attn_implementation)
    batch = grouped_batch(96, *lengths, seed=1, interleave=interleave)
    mask = batch["response_mask"].bool()
    a, ea = response_log_probs(padded_model, batch, 0.7, with_entropy=True)
    b, eb = forward.log_probs(shared_model, batch, 0.7, with_entropy=True)
    assert torch.allclose(a[mask], b[mask], atol=1e-5) and torch.allclose(ea[mask], eb[mask], atol=1e-5)
    assert not b[~mask].any() and not eb[~mask].any()
    (a[mask].sum() + ea[mask].sum()).backward()
    (b[mask].sum() + eb[mask].sum()).backward()
    for (name, p), q in zip(padded_model.named_parameters(), shared_model.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4), name


def test_shared_bf16_equals_packed_bf16_within_its_rounding():
    """Under bf16 autocast the shared prompt's forward is the same arithmetic as each row's: log-probs equal the
    packed path's to bf16's resolution, gradients (the prompt's summed once over its rows) to 2 % of their size."""
    batch = grouped_batch(96, *SHORT, seed=2)
    mask = batch["response_mask"].bool()
    results = []
    for settings in (PACKED, SHARED):
        model, forward = tiny("qwen3"), ModelForward(settings)
        model.set_attn_implementation(forward.attn_implementation)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            log_probs, entropy = forward.log_probs(model, batch, with_entropy=True)
        (log_probs[mask].sum() + entropy[mask].sum()).backward()
        results.append((log_probs, [p.grad for p in model.parameters()]))
    (a, grads_a), (b, grads_b) = results
    assert (a - b)[mask].abs().max() < 1e-2
    for ga, gb in zip(grads_a, grads_b):
        assert (ga - gb).abs().max() <= 0.02 * ga.abs().max()


def update_batch(actor: Actor, seed=0):
    """8 prompts × 4 samples with advantages, and old log-probs from `actor`."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 7, (32,), generator=g).tolist()
    batch = grouped_batch(40, torch.randint(3, 12, (8,), generator=g).tolist(), lengths, 4, seed=seed)
    batch["old_log_probs"] = actor.log_probs(batch)[0]
    batch["advantages"] = torch.randn(batch["response_mask"].shape, generator=g) * batch["response_mask"]
    return batch


@pytest.mark.timeout(300)
@pytest.mark.parametrize("budget", [None, 40])
def test_shared_actor_makes_the_padded_update(tiny_model_dir, budget):
    """Two updates of 2 epochs × 2 mini-batches (shuffled), by rows or by a token budget: the same losses, grad
    norms and weights as padded rows. Not to the last bit: RMSNorm computes in fp32, and a shared prompt's
    gradient goes through it once, summed, where padded rows round each row's share on its own (in float64 the
    shared and packed gradients differ by 1e-7 relative, the packed and padded by 1e-15); eight Adam steps at
    lr 1e-3, which move weights by ~1e-2, leave ~5e-5 of that (plain packed rows: ~3e-5)."""
    settings = dict(SETTINGS, ppo_mini_batch_size=16, ppo_micro_batch_size_per_gpu=4,
                    ppo_max_token_len_per_gpu=budget)
    optim = OptimSettings(lr=1e-3, total_steps=4)
    padded = Actor(str(tiny_model_dir), "cpu", ActorSettings(**settings), optim)
    shared = Actor(str(tiny_model_dir), "cpu", ActorSettings(**settings, sequences=SHARED), optim)
    batch = update_batch(padded)
    mask = batch["response_mask"]
    log_probs, entropy = shared.log_probs(batch)
    assert torch.allclose(log_probs, batch["old_log_probs"] * mask, atol=1e-5)
    for _ in range(2):
        m_padded, m_shared = padded.update(batch), shared.update(batch)
        assert m_shared["actor/pg_loss"] == pytest.approx(m_padded["actor/pg_loss"], abs=1e-5)
        assert m_shared["actor/grad_norm"] == pytest.approx(m_padded["actor/grad_norm"], rel=1e-4)
    for p, q in zip(padded.model.parameters(), shared.model.parameters()):
        assert torch.allclose(p, q, atol=2e-4)


def test_a_prompts_rows_stay_together_on_a_rank_and_in_a_token_budget():
    group = [0, 0, 1, 1, 2, 2, 3, 3]
    prompt = [5, 5, 2, 2, 9, 9, 1, 1]
    tokens = [7, 8, 4, 3, 10, 12, 2, 2]  # prompt + response
    units, weights = prompt_units(group, prompt, tokens)
    assert units == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert weights == [5 + 2 + 3, 2 + 2 + 1, 9 + 1 + 3, 1 + 1 + 1]
    parts = balanced_unit_partition(units, weights, 2)
    assert parts == [[4, 5, 6, 7], [0, 1, 2, 3]]  # heaviest first, to the lightest: 13 + 3 against 10 + 5
    # a prompt whose rows outweigh the budget is left as rows; unequal units cannot split evenly
    units, weights = prompt_units(group, prompt, tokens, budget=12)
    assert units == [[0, 1], [2, 3], [4], [5], [6, 7]] and weights == [10, 5, 10, 12, 3]
    assert balanced_unit_partition([[0, 1], [2]], [1, 1], 2) is None
    assert balanced_unit_partition([[0, 1], [2, 3], [4, 5]], [1, 1, 1], 2) is None


@pytest.mark.timeout(300)
def test_two_workers_with_shared_prefixes_make_the_update_of_one(tiny_model_dir):
    """DP 2, balanced by whole prompts: the pg_loss, grad norm and weights of one padded process (to the float
    noise the test above explains)."""
    settings = dict(SETTINGS, ppo_mini_batch_size=16, ppo_micro_batch_size_per_gpu=4)
    optim = OptimSettings(lr=1e-3, total_steps=4)
    single = Actor(str(tiny_model_dir), "cpu", ActorSettings(**settings), optim)
    batch = update_batch(single, seed=3)
    group = ActorGroup(partial(ProcessWorkerGroup, 2), "cpu",
                       ActorSpec(str(tiny_model_dir), ActorSettings(**settings, sequences=SHARED), optim))
    try:
        assert torch.allclose(group.log_probs(batch)[0], batch["old_log_probs"] * batch["response_mask"], atol=1e-5)
        for _ in range(2):
            m1, m2 = single.update(batch), group.update(batch)
            assert m1["actor/pg_loss"] == pytest.approx(m2["actor/pg_loss"], abs=1e-3)
            assert m1["actor/grad_norm"] == pytest.approx(m2["actor/grad_norm"], rel=1e-3)
        theirs = dict(group.named_weights())
        for name, p in single.model.named_parameters():
            assert torch.allclose(p, theirs[name], atol=2e-4), name
    finally:
        group.close()


@pytest.mark.parametrize("overrides", [
    [f"{A}.actor.strategy=megatron"],
    ["trainer.n_gpus_per_node=2", f"{A}.actor.ulysses_sequence_parallel_size=2", f"{A}.model.use_remove_padding=True"],
])
def test_where_shared_prefixes_are_not_built_the_plan_says_they_have_no_effect(overrides):
    """Shared prefixes change the speed, not the update: where they are not built the run goes on without them,
    and says so."""
    plan = plan_of(f"{A}.actor.use_prefix_grouper=True", *overrides)
    assert not plan.errors, plan.errors
    assert any(w.startswith(f"{A}.actor.use_prefix_grouper") and "has no effect with the Megatron engine" in w
               for w in plan.warnings), plan.warnings
    assert not any("use_prefix_grouper" in w for w in plan_of(f"{A}.actor.use_prefix_grouper=True").warnings)


def test_ulysses_runs_without_shared_prefixes():
    from ascend_rl.config import load_config
    from ascend_rl.trainer.actor_specs import fsdp_spec

    cfg = load_config([f"{A}.model.path=/m", f"{A}.actor.use_prefix_grouper=True", "trainer.n_gpus_per_node=2",
                       f"{A}.actor.ulysses_sequence_parallel_size=2", f"{A}.model.use_remove_padding=True"])
    assert fsdp_spec(cfg, "cpu", 10, with_ref=True).settings.sequences == SequenceSettings(True, 2, False)
    cfg = load_config([f"{A}.model.path=/m", f"{A}.actor.use_prefix_grouper=True"])
    spec = fsdp_spec(cfg, "cpu", 10, with_ref=True)
    assert spec.settings.sequences.shared_prefix and spec.ref.sequences.shared_prefix

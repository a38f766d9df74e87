"""The RL math: checked values from verl, hand-worked cases, float64 references, and properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ascend_rl.algorithms import (
    ADV_ESTIMATORS,
    AdaptiveKLController,
    agg_denominator,
    agg_loss,
    apply_kl_in_reward,
    compute_advantages,
    compute_policy_loss,
    entropy_from_logits,
    groups_with_signal,
    kl_penalty,
    log_probs_from_logits,
    make_kl_controller,
    masked_whiten,
    overlong_penalty,
    register_adv_estimator,
    register_policy_loss,
    value_loss,
)


@pytest.fixture(autouse=True, scope="module")
def float64_by_default():
    """The math is checked in float64; other test modules keep torch's float32 default."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def last_token_rewards(scores, length=3):
    r = torch.zeros(len(scores), length)
    r[:, -1] = torch.tensor(scores, dtype=r.dtype)
    return r


def adv(name, scores, index, mask=None, **kw):
    rewards = last_token_rewards(scores)
    mask = torch.ones_like(rewards) if mask is None else mask
    return compute_advantages(name, token_level_rewards=rewards, response_mask=mask, index=index, **kw)


# --- checked values (reference: algorithms.md) ---------------------------------------------------------

def test_grpo_checked_values():
    a, r = adv("grpo", [1, 0, 0, 1], ["u"] * 4)
    assert a[:, 0].tolist() == pytest.approx([0.86602, -0.86602, -0.86602, 0.86602], abs=1e-5)
    assert torch.equal(a, r)
    a, _ = adv("grpo", [1, 1, 1, 0, 0, 0, 0, 0], [7] * 8)
    assert a[0, 0].item() == pytest.approx(1.20761, abs=1e-5)
    assert a[-1, 0].item() == pytest.approx(-0.72457, abs=1e-5)


def test_k3_checked_value():
    assert kl_penalty(torch.tensor(-1.0), torch.tensor(-1.5), "low_var_kl").item() == pytest.approx(0.10653, abs=1e-5)


def test_dual_clip_checked_value():
    loss, m = compute_policy_loss("vanilla", old_log_prob=torch.zeros(1, 1), log_prob=torch.tensor([[math.log(4)]]),
                                  advantages=-torch.ones(1, 1), response_mask=torch.ones(1, 1))
    assert loss.item() == pytest.approx(3.0)
    assert m["pg_clipfrac_lower"].item() == 1.0


# --- hand-worked cases ---------------------------------------------------------------------------------

def test_grpo_dr_grpo_and_groups():
    a, _ = adv("grpo", [1, 0, 3, 1], ["a", "a", "b", "b"], norm_adv_by_std_in_grpo=False)
    assert a[:, 0].tolist() == pytest.approx([0.5, -0.5, 1.0, -1.0])


def test_grpo_group_of_one_keeps_its_score_like_verl():
    # verl: a group of one has mean 0 and std 1, so A = s/(1+ε); an all-zero reward gives 0.
    a, _ = adv("grpo", [1.0, 0.0], ["a", "b"])
    assert a[:, 0].tolist() == pytest.approx([1 / (1 + 1e-6), 0.0])


def test_rloo():
    a, _ = adv("rloo", [1, 0, 0], ["g"] * 3)
    # s_i minus the mean of the others: 1 − 0 = 1, 0 − 0.5 = −0.5
    assert a[:, 0].tolist() == pytest.approx([1.0, -0.5, -0.5])


def test_opo_length_weighted_baseline():
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # lengths 2 and 1
    a, _ = compute_advantages("opo", token_level_rewards=rewards, response_mask=mask, index=[0, 0])
    baseline = (2 * 1 + 1 * 0) / 3
    assert torch.allclose(a, torch.tensor([[1 - baseline, 1 - baseline], [-baseline, 0.0]]))


def test_remax():
    rewards = torch.tensor([[0.0, 1.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    a, r = compute_advantages("remax", token_level_rewards=rewards, response_mask=mask, index=[0],
                              reward_baselines=torch.tensor([0.5]))
    assert r.tolist() == [[1.0, 1.0, 0.0]]
    assert a.tolist() == [[0.5, 0.5, 0.0]]


def test_reinforce_plus_plus_returns_ignore_padding():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    _, returns = compute_advantages("reinforce_plus_plus", token_level_rewards=rewards, response_mask=mask,
                                    index=[0], gamma=0.5)
    # verl: the padding's reward never enters and its return is 0: G_2 = 2, G_1 = 0 + 0.5·2 = 1, G_0 = 1.5
    assert returns.tolist() == [[1.5, 1.0, 2.0, 0.0]]


def test_reinforce_plus_plus_baseline_whitens_group_centred_scores():
    a, _ = adv("reinforce_plus_plus_baseline", [2, 0], ["g", "g"])
    centred = torch.tensor([[1.0] * 3, [-1.0] * 3])
    assert torch.allclose(a, masked_whiten(centred, torch.ones(2, 3)))
    assert a.mean().item() == pytest.approx(0, abs=1e-9)


def gae_reference(rewards, values, mask, gamma, lam):
    """Textbook GAE on each sequence's unmasked positions only (float64)."""
    out = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        pos = [t for t in range(rewards.shape[1]) if mask[i, t] > 0]
        last = 0.0
        for k in reversed(range(len(pos))):
            t = pos[k]
            next_v = values[i, pos[k + 1]] if k + 1 < len(pos) else 0.0
            last = rewards[i, t] + gamma * next_v - values[i, t] + gamma * lam * last
            out[i, t] = last
    return out


def test_gae_matches_a_reference_and_skips_masked_positions():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 0, 1]], dtype=torch.float64)
    adv_w, returns = compute_advantages("gae", token_level_rewards=rewards, response_mask=mask, index=[0, 1, 2],
                                        values=values, gamma=0.9, lam=0.8)
    ref = gae_reference(rewards, values, mask, 0.9, 0.8)
    assert torch.allclose((returns - values) * mask, ref * mask)
    assert torch.allclose(adv_w * mask, masked_whiten(ref, mask) * mask)


def test_policy_loss_variants_hand_worked():
    old = torch.zeros(1, 2)
    new = torch.tensor([[math.log(1.5), math.log(0.5)]])
    adv_ = torch.tensor([[1.0, 1.0]])
    mask = torch.ones(1, 2)
    common = dict(old_log_prob=old, log_prob=new, advantages=adv_, response_mask=mask)
    # vanilla: ratios 1.5 → clipped to 1.2 (loss −1.2), 0.5 stays (loss −0.5, max(−0.5, −0.8)); token mean
    loss, m = compute_policy_loss("vanilla", **common)
    assert loss.item() == pytest.approx((-1.2 - 0.5) / 2)
    assert m["pg_clipfrac"].item() == pytest.approx(0.5)
    assert m["ppo_kl"].item() == pytest.approx(-(math.log(1.5) + math.log(0.5)) / 2)
    # clip-higher: the upper bound 1.28 no longer binds on 1.5? it does (1.5 > 1.28): −1.28
    loss, _ = compute_policy_loss("vanilla", clip_ratio_high=0.28, **common)
    assert loss.item() == pytest.approx((-1.28 - 0.5) / 2)
    # gpg: −logπ·A
    loss, _ = compute_policy_loss("gpg", **common)
    assert loss.item() == pytest.approx(-(math.log(1.5) + math.log(0.5)) / 2)
    # cispo: −sg(clip(r))·A·logπ = −(1.2·log1.5 + 0.8·log0.5)/2
    loss, _ = compute_policy_loss("cispo", **common)
    assert loss.item() == pytest.approx(-(1.2 * math.log(1.5) + 0.8 * math.log(0.5)) / 2)
    # sapo with A > 0: gate = σ(r − 1)·4
    loss, _ = compute_policy_loss("sapo", **common)
    gates = [4 / (1 + math.exp(-(r - 1))) for r in (1.5, 0.5)]
    assert loss.item() == pytest.approx(-sum(gates) / 2)
    # gspo: sequence ratio exp(mean Δ) = exp((log1.5 + log0.5)/2) = sqrt(0.75) ≈ 0.866 (inside the clip)
    loss, _ = compute_policy_loss("gspo", **common)
    assert loss.item() == pytest.approx(-math.sqrt(0.75))


def test_gspo_gradient_is_per_token():
    new = torch.tensor([[0.1, -0.2]], requires_grad=True)
    loss, _ = compute_policy_loss("gspo", old_log_prob=torch.zeros(1, 2), log_prob=new, advantages=torch.ones(1, 2),
                                  response_mask=torch.ones(1, 2))
    loss.backward()
    seq_ratio = math.exp(-0.05)
    assert torch.allclose(new.grad, torch.full((1, 2), -seq_ratio / 2))


def test_agg_modes_hand_worked():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert agg_loss(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    # verl: the sequence modes count the rows with a token (2 here, the third row is fully masked)
    assert agg_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert agg_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx((6 + 4) / 2 / 3)
    assert agg_loss(loss, mask, "seq-mean-token-sum-norm", loss_scale_factor=10).item() == pytest.approx(10 / 2 / 10)
    assert agg_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert agg_loss(loss, mask, "token-sum").item() == pytest.approx(10)
    with pytest.raises(ValueError, match="valid: token-mean, token-sum, seq-mean-token-sum"):
        agg_loss(loss, mask, "token-average")


def test_kl_estimators_and_straight_through():
    lp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    assert kl_penalty(lp, ref, "kl").item() == pytest.approx(0.5)
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_penalty(ref, lp, "abs").item() == pytest.approx(0.5)
    assert kl_penalty(lp, ref, "mse").item() == pytest.approx(0.125)
    x = torch.tensor([-1.0], requires_grad=True)
    value = kl_penalty(x, ref, "k3+")
    value.backward()
    assert value.item() == pytest.approx(0.10653, abs=1e-5)  # k3's value
    assert x.grad.item() == pytest.approx(0.5)  # k2's gradient: (logp − ref)
    with pytest.raises(ValueError, match="valid: abs, k1, k2, k3, kl, low_var_kl, mse"):
        kl_penalty(lp, ref, "k4")


def test_kl_controllers():
    fixed = make_kl_controller("fixed", kl_coef=0.1)
    fixed.update(5.0, 100)
    assert fixed.value == 0.1
    ctl = make_kl_controller("adaptive", kl_coef=0.1, target_kl=0.1, horizon=100)
    assert isinstance(ctl, AdaptiveKLController)
    ctl.update(current_kl=1.0, n_steps=10)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctl.update(current_kl=0.09, n_steps=10)  # error −0.1
    assert ctl.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 10 / 100))


def test_kl_in_reward():
    scores = torch.tensor([[0.0, 1.0]])
    rewards, metrics = apply_kl_in_reward(scores, torch.tensor([[-1.0, -1.0]]), torch.tensor([[-1.5, -1.0]]),
                                          torch.ones(1, 2), make_kl_controller("fixed", 0.1), kind="kl")
    assert torch.allclose(rewards, torch.tensor([[-0.05, 1.0]]))
    assert metrics["actor/reward_kl_penalty"] == pytest.approx(0.25)
    assert metrics["actor/reward_kl_penalty_coeff"] == 0.1


def test_value_loss_clipping():
    vpreds, values, returns = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    loss, clipfrac = value_loss(vpreds, values, returns, torch.ones(1, 2), cliprange_value=0.5)
    # token 0: max((2−0)², (0.5−0)²) = 4; token 1: max(1, 1) = 1 → ½·mean = 1.25
    assert loss.item() == pytest.approx(1.25)
    assert clipfrac.item() == 0.0


def test_dapo_pieces():
    keep = groups_with_signal(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5]), ["a", "a", "b", "b", "c"])
    assert keep.tolist() == [False, False, True, True, True]
    pen = overlong_penalty(torch.tensor([10, 12, 14, 16]), max_response_length=16, overlong_buffer_len=4,
                           penalty_factor=1.0)
    assert pen.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0])


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'ppo' \(algorithm.adv_estimator\); valid: gae, gdpo, gpg"):
        compute_advantages("ppo")
    with pytest.raises(ValueError, match="valid: bypass_mode, cispo, clip_cov, dppo_kl, dppo_tv, dro, geo_mean"):
        compute_policy_loss("clip")


def test_registering_user_functions():
    @register_adv_estimator("test_constant")
    def constant(*, response_mask, **_):
        return response_mask * 2, response_mask * 2

    @register_policy_loss("test_zero")
    def zero(*, log_prob, **_):
        return log_prob.sum() * 0, {}

    try:
        a, _ = adv("test_constant", [1, 0], [0, 0])
        assert a.tolist() == [[2.0] * 3] * 2
        assert compute_policy_loss("test_zero", log_prob=torch.ones(2))[0].item() == 0
    finally:
        ADV_ESTIMATORS._entries.pop("test_constant")
        from ascend_rl.algorithms import POLICY_LOSSES
        POLICY_LOSSES._entries.pop("test_zero")


# --- logits: log-probs and entropy ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_probs_and_entropy_match_torch_with_gradients(dtype):
    torch.manual_seed(1)
    logits = (torch.randn(3, 7, 50) * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (3, 7))
    weights = torch.randn(3, 7, dtype=torch.float32)
    ref_logits = logits.detach().double().requires_grad_()
    ref_lp = torch.log_softmax(ref_logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    ref_ent = -(torch.softmax(ref_logits, -1) * torch.log_softmax(ref_logits, -1)).sum(-1)
    lp = log_probs_from_logits(logits, labels, chunk_rows=4)
    ent = entropy_from_logits(logits, chunk_rows=5)
    assert lp.dtype == ent.dtype == torch.float32
    assert torch.allclose(lp.double(), ref_lp, atol=1e-5)
    assert torch.allclose(ent.double(), ref_ent, atol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    g, = torch.autograd.grad((lp * weights).sum() + (ent * weights).sum(), logits)
    g_ref, = torch.autograd.grad((ref_lp * weights.double()).sum() + (ref_ent * weights.double()).sum(), ref_logits)
    assert g.dtype == dtype
    assert torch.allclose(g.double(), g_ref, atol=tol)


def test_log_probs_extreme_logits_are_finite():
    logits = torch.tensor([[[1e4, -1e4, 0.0]]], dtype=torch.float32)
    assert torch.isfinite(log_probs_from_logits(logits, torch.tensor([[1]]))).all()
    assert torch.isfinite(entropy_from_logits(logits)).all()


# --- properties ----------------------------------------------------------------------------------------

scores_st = st.lists(st.sampled_from([0.0, 0.5, 1.0, -1.0]), min_size=2, max_size=12)
GROUP_ESTIMATORS = ["grpo", "rloo", "opo", "reinforce_plus_plus_baseline"]


@settings(max_examples=40, deadline=None)
@given(scores=scores_st, groups=st.integers(1, 4), perm_seed=st.integers(0, 1000))
def test_group_estimators_are_invariant_to_sample_order(scores, groups, perm_seed):
    index = [i % groups for i in range(len(scores))]
    perm = torch.randperm(len(scores), generator=torch.Generator().manual_seed(perm_seed))
    for name in GROUP_ESTIMATORS:
        a, _ = adv(name, scores, index)
        b, _ = adv(name, [scores[i] for i in perm], [index[i] for i in perm])
        assert torch.allclose(a[perm], b, atol=1e-9), name


@settings(max_examples=40, deadline=None)
@given(scores=scores_st, junk=st.floats(-1e6, 1e6))
def test_masked_positions_never_influence_results(scores, junk):
    n = len(scores)
    mask = torch.ones(n, 4)
    mask[:, -1] = 0
    rewards = torch.zeros(n, 4)
    rewards[:, 2] = torch.tensor(scores)
    polluted = rewards.clone()
    polluted[:, -1] = junk
    values = torch.linspace(-1, 1, n * 4).view(n, 4)
    values_polluted = values.clone()
    values_polluted[:, -1] = junk
    for name in ["grpo", "rloo", "opo", "reinforce_plus_plus_baseline", "reinforce_plus_plus", "remax", "gae"]:
        kw = dict(response_mask=mask, index=[i % 2 for i in range(n)], reward_baselines=torch.zeros(n), gamma=0.9)
        a, _ = compute_advantages(name, token_level_rewards=rewards, values=values, **kw)
        b, _ = compute_advantages(name, token_level_rewards=polluted, values=values_polluted, **kw)
        assert torch.allclose(a * mask, b * mask, atol=1e-9), name
    loss_a = agg_loss(rewards, mask, "token-mean")
    loss_b = agg_loss(polluted.masked_fill(mask == 0, float("nan")), mask, "token-mean")
    assert torch.equal(loss_a, loss_b)


def test_grpo_single_sample_groups_do_not_touch_other_groups():
    a, _ = adv("grpo", [1, 0, 1, 5], ["a", "a", "a", "solo"])
    b, _ = adv("grpo", [1, 0, 1], ["a", "a", "a"])
    assert torch.allclose(a[:3], b)


@settings(max_examples=30, deadline=None)
@given(n_micro=st.integers(1, 4), ranks=st.integers(1, 3), seed=st.integers(0, 10_000),
       mode=st.sampled_from(["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]))
def test_micro_batches_with_global_counts_equal_the_whole_batch(n_micro, ranks, seed, mode):
    g = torch.Generator().manual_seed(seed)
    rows = n_micro * ranks * 2
    loss = torch.randn(rows, 5, generator=g)
    mask = (torch.rand(rows, 5, generator=g) > 0.3).double()
    mask[:, 0] = 1  # every sequence has a token
    whole = agg_loss(loss, mask, mode)
    pieces = list(zip(loss.chunk(n_micro * ranks), mask.chunk(n_micro * ranks)))
    total = sum(agg_denominator(m, mode) for _, m in pieces)  # the all-reduced count
    key = "global_num_tokens" if mode == "token-mean" else "global_batch_size"
    summed = sum(agg_loss(l_, m, mode, **{key: total}) for l_, m in pieces)
    assert torch.allclose(summed, whole, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(delta=st.floats(-1e4, 1e4), a=st.floats(-100, 100), name=st.sampled_from(["vanilla", "gspo", "cispo", "sapo"]))
def test_losses_are_finite_for_extreme_log_ratios(delta, a, name):
    log_prob = torch.tensor([[delta, -delta]], requires_grad=True)
    loss, metrics = compute_policy_loss(name, old_log_prob=torch.zeros(1, 2), log_prob=log_prob,
                                        advantages=torch.full((1, 2), a), response_mask=torch.ones(1, 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(log_prob.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())

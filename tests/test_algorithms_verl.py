"""ascend_rl.algorithms against verl 0.9.1's definitions: hand-worked numbers, and plain-loop float64
references of verl's formulas compared on seeded random cases (gaps inside responses, fully masked rows,
groups of one, groups in mixed order, log-ratios up to ±5), values and gradients w.r.t. log_prob."""

import math

import pytest
import torch

from ascend_rl.algorithms import (
    agg_denominator,
    agg_loss,
    compute_advantages,
    compute_policy_loss,
    entropy_from_logits,
    global_counts,
    policy_loss_kwargs,
)
from ascend_rl.algorithms.rollout_correction import is_weights, rejection_mask

F64 = torch.float64
TOL = 2e-5
MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")
SEEDS = range(200)


def t64(rows):
    return torch.tensor(rows, dtype=F64)


def random_case(seed, seq_adv=False):
    g = torch.Generator().manual_seed(seed)
    b, t = int(torch.randint(1, 7, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
    mask = (torch.rand(b, t, generator=g, dtype=F64) < 0.75).to(F64)
    if seed % 5 == 0:
        mask[0] = 0  # a fully masked row
    old = -5 * torch.rand(b, t, generator=g, dtype=F64)  # log-probs in (−5, 0): |log-ratio| < 5
    new = -5 * torch.rand(b, t, generator=g, dtype=F64)
    adv = torch.randn(b, 1 if seq_adv else t, generator=g, dtype=F64).expand(b, t).contiguous()
    index = torch.randint(0, 3, (b,), generator=g).tolist()  # groups of one and mixed order
    return dict(old=old, new=new, adv=adv, mask=mask, index=index, g=g)


# --- plain-loop references of verl's formulas ------------------------------------------------------------

def ref_agg_weights(mask, mode):
    """w with agg_loss(L) = Σ w·L under verl's local counts."""
    m = mask.tolist()
    n_tokens = sum(map(sum, m))
    seqs = sum(1 for row in m if sum(row) > 0)
    w = [[0.0] * len(row) for row in m]
    for i, row in enumerate(m):
        for t, v in enumerate(row):
            if not v:
                continue
            w[i][t] = {"token-mean": 1 / max(n_tokens, 1), "token-sum": 1.0, "seq-mean-token-sum": 1 / max(seqs, 1),
                       "seq-mean-token-sum-norm": 1 / max(seqs, 1) / len(row),
                       "seq-mean-token-mean": 1 / sum(row) / max(seqs, 1)}[mode]
    return t64(w)


def per_token(fn, case, **kw):
    """(loss, d loss/d log_prob) per token from a scalar rule fn(lp, old, a, **kw) → (value, derivative)."""
    out = [[fn(lp, o, a, **kw) for lp, o, a in zip(*rows)]
           for rows in zip(case["new"].tolist(), case["old"].tolist(), case["adv"].tolist())]
    return t64([[v for v, _ in r] for r in out]), t64([[d for _, d in r] for r in out])


def ref_vanilla(lp, old, a, low=0.2, high=0.2, c=3.0):
    r = math.exp(max(-20, min(20, lp - old)))
    unclipped, clipped = -a * r, -a * min(max(r, 1 - low), 1 + high)
    value, d = max(unclipped, clipped), (-a * r if unclipped >= clipped else 0.0)
    if a < 0 and value > -a * c:
        return -a * c, 0.0
    return value, d


def ref_cispo(lp, old, a, low=0.2, high=0.2):
    w = min(max(math.exp(lp - old), 1 - low), 1 + high)
    return -w * a * lp, -w * a


def ref_sapo(lp, old, a, tau_pos=1.0, tau_neg=1.05):
    r, tau = math.exp(lp - old), tau_pos if a > 0 else tau_neg
    s = 1 / (1 + math.exp(-tau * (r - 1)))
    return -a * s * 4 / tau, -a * 4 * s * (1 - s) * r


def ref_dppo(lp, old, a, kind, low=0.2, high=0.2, c=3.0):
    p, q, r = math.exp(lp), math.exp(old), math.exp(lp - old)
    if kind == "tv":
        valid = (p - q <= high) if a > 0 else (p - q >= -low)
    else:
        kl = q * (old - lp) + (1 - q) * math.log((1 - q + 1e-8) / (1 - p + 1e-8))
        valid = (kl <= high or p <= q) if a > 0 else (kl <= low or p >= q)
    w = min(r, c) * valid
    return -a * w * lp, -a * w


def ref_dro(lp, old, a, beta):
    return -(lp * a - 0.5 * beta * (lp - old) ** 2), -(a - beta * (lp - old))


def ref_whiten(x, mask):
    vals = [v for v, m in zip(x.flatten().tolist(), mask.flatten().tolist()) if m]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / len(vals) * (len(vals) / (len(vals) - 1) if len(vals) > 1 else 1)
    return (x - mean) / math.sqrt(var + 1e-8)


def groups_of(index):
    out = {}
    for i, k in enumerate(index):
        out.setdefault(k, []).append(i)
    return out.values()


def scores_of(case):
    return [sum(r * m for r, m in zip(rr, mm)) for rr, mm in zip(case["rew"].tolist(), case["mask"].tolist())]


def with_rewards(case):
    case["rew"] = torch.randn(case["mask"].shape, generator=case["g"], dtype=F64).round() * case["mask"]
    return case


def loss_and_grad(name, case, **kw):
    lp = case["new"].clone().requires_grad_()
    loss, metrics = compute_policy_loss(name, old_log_prob=case["old"], log_prob=lp, advantages=case["adv"],
                                        response_mask=case["mask"], **kw)
    (grad,) = torch.autograd.grad(loss, lp, allow_unused=True)
    return loss.detach(), (torch.zeros_like(lp) if grad is None else grad), metrics


def assert_close(actual, expected, tol=TOL):
    assert torch.allclose(torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64), atol=tol, rtol=0), \
        (actual, expected)


# --- 1. sapo always aggregates seq-mean-token-mean ----------------------------------------------------------

def test_sapo_ignores_loss_agg_mode_hand_worked():
    mask = t64([[1, 0, 0], [1, 1, 1]])
    adv = t64([[1, 1, 1], [-1, -1, -1]])
    # r = 1: gate 2/τ; row 0 (A > 0, τ = 1): −2; row 1 (τ = 1.05): +2/1.05 per token
    for mode in MODES:
        loss, _ = compute_policy_loss("sapo", old_log_prob=torch.zeros(2, 3, dtype=F64),
                                      log_prob=torch.zeros(2, 3, dtype=F64), advantages=adv, response_mask=mask,
                                      loss_agg_mode=mode)
        assert loss.item() == pytest.approx((-2 + 2 / 1.05) / 2)  # −0.047619, token-mean would be 0.928571


# --- 2. reinforce++ carries the return through gaps ----------------------------------------------------------

def test_reinforce_plus_plus_hand_worked():
    rewards, mask = t64([[0, 0, 0, 1]]), t64([[1, 1, 0, 1]])
    _, returns = compute_advantages("reinforce_plus_plus", token_level_rewards=rewards, response_mask=mask, gamma=1.0)
    assert returns.tolist() == [[1.0, 1.0, 0.0, 1.0]]
    _, returns = compute_advantages("reinforce_plus_plus", token_level_rewards=rewards, response_mask=mask, gamma=0.5)
    assert returns.tolist() == [[0.25, 0.5, 0.0, 1.0]]  # γ applies once across the gap


def test_reinforce_plus_plus_matches_reference():
    for seed in SEEDS:
        case = with_rewards(random_case(seed))
        rew, mask = case["rew"].tolist(), case["mask"].tolist()
        ref = []
        for r_row, m_row in zip(rew, mask):
            running, out = 0.0, [0.0] * len(r_row)
            for t in reversed(range(len(r_row))):
                if m_row[t]:
                    running = r_row[t] + 0.9 * running
                    out[t] = running
            ref.append(out)
        adv, returns = compute_advantages("reinforce_plus_plus", token_level_rewards=case["rew"],
                                          response_mask=case["mask"], gamma=0.9)
        assert_close(returns, ref)
        if case["mask"].sum() > 1:
            assert_close(adv, ref_whiten(t64(ref), case["mask"]) * case["mask"])


# --- 3. aggregation: verl's local counts, token-sum, and exact micro-batches -----------------------------------

def test_agg_hand_worked():
    loss = t64([[1, 2, 3], [4, 0, 0], [9, 9, 9]])
    mask = t64([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert agg_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx(5.0)  # (6 + 4)/2, not /3
    assert agg_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(5.0 / 3)
    assert agg_loss(loss, mask, "token-sum").item() == pytest.approx(10.0)
    assert agg_denominator(mask, "seq-mean-token-sum").item() == 2
    assert global_counts(mask) == {"global_num_tokens": 4, "global_batch_size": 2}


def test_agg_matches_reference_and_splits_exactly():
    for seed in SEEDS:
        case = random_case(seed)
        loss_mat, mask = case["new"], case["mask"]
        for mode in MODES:
            assert_close(agg_loss(loss_mat, mask, mode), (ref_agg_weights(mask, mode) * loss_mat).sum())
            counts = global_counts(mask)
            pieces = zip(loss_mat.split(2), mask.split(2))  # micro-batches; their losses add up to the whole
            assert_close(sum(agg_loss(lm, m, mode, **counts) for lm, m in pieces), agg_loss(loss_mat, mask, mode))


# --- 4. entropy at large logits --------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [0.0, 40.0, 100.0])
def test_entropy_is_accurate_at_large_logits(shift):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 1000, generator=g) * 2 + shift
    ref = -(torch.softmax(logits.double(), -1) * torch.log_softmax(logits.double(), -1)).sum(-1)
    err = (entropy_from_logits(logits).double() - ref).abs().max().item()
    assert err < 5e-6, err  # the unshifted float32 form was off by 6.8e-5 at logits ≈ 40
    z = logits.double().requires_grad_()
    h = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum()
    (g_ref,) = torch.autograd.grad(h, z)
    (g_ours,) = torch.autograd.grad(entropy_from_logits(logits.requires_grad_()).sum(), logits)
    assert (g_ours.double() - g_ref).abs().max().item() < 1e-6


# --- 5. gspo uses the configured aggregation ------------------------------------------------------------------

def test_gspo_uses_loss_agg_mode_hand_worked():
    mask = t64([[1, 0], [1, 1]])
    common = dict(old_log_prob=torch.zeros(2, 2, dtype=F64), log_prob=torch.zeros(2, 2, dtype=F64),
                  advantages=t64([[1, 1], [-2, -2]]), response_mask=mask)
    # r = 1 everywhere: per-token loss −A = −1 (row 0), +2, +2 (row 1)
    assert compute_policy_loss("gspo", loss_agg_mode="token-mean", **common)[0].item() == pytest.approx(1.0)
    assert compute_policy_loss("gspo", loss_agg_mode="seq-mean-token-mean", **common)[0].item() == pytest.approx(0.5)
    assert compute_policy_loss("gspo", **common)[0].item() == pytest.approx(0.5)  # verl's default


# --- 6/7. every policy loss: value and gradient against the references ------------------------------------------

TOKEN_LOSSES = {
    "vanilla": (ref_vanilla, {}, {}),
    "cispo": (ref_cispo, {}, {}),
    "gpg": (lambda lp, o, a: (-lp * a, -a), {}, {}),
    "dppo_tv": (lambda lp, o, a: ref_dppo(lp, o, a, "tv", c=3.0), {"clip_ratio_c": 3.0}, {}),
    "dppo_kl": (lambda lp, o, a: ref_dppo(lp, o, a, "kl", low=0.5, high=0.05),
                {"clip_ratio_low": 0.5, "clip_ratio_high": 0.05, "clip_ratio_c": 3.0}, {}),
    "dro": (lambda lp, o, a: ref_dro(lp, o, a, 0.3), {"dro_beta": 0.3}, {}),
}


@pytest.mark.parametrize("name", sorted(TOKEN_LOSSES))
def test_token_losses_match_reference(name):
    rule, kw, _ = TOKEN_LOSSES[name]
    for seed in SEEDS:
        case = random_case(seed)
        values, derivs = per_token(rule, case)
        for mode in ("token-mean", "seq-mean-token-mean", "token-sum"):
            w = ref_agg_weights(case["mask"], mode)
            loss, grad, _ = loss_and_grad(name, case, loss_agg_mode=mode, **kw)
            assert_close(loss, (w * values).sum())
            assert_close(grad, w * derivs)


def test_sapo_matches_reference():
    for seed in SEEDS:
        case = random_case(seed)
        values, derivs = per_token(ref_sapo, case)
        w = ref_agg_weights(case["mask"], "seq-mean-token-mean")
        loss, grad, _ = loss_and_grad("sapo", case, loss_agg_mode="token-mean")
        assert_close(loss, (w * values).sum())
        assert_close(grad, w * derivs)


def test_gspo_matches_reference():
    for seed in SEEDS:
        case = random_case(seed)
        mask, adv = case["mask"].tolist(), case["adv"].tolist()
        values, derivs = [], []
        for lp_row, o_row, a_row, m_row in zip(case["new"].tolist(), case["old"].tolist(), adv, mask):
            n = max(sum(m_row), 1)
            rho = math.exp(min(sum((lp - o) * m for lp, o, m in zip(lp_row, o_row, m_row)) / n, 10))
            row = [(max(-a * rho, -a * min(max(rho, 0.8), 1.2)), -a * rho if -a * rho >= -a * min(max(rho, 0.8), 1.2)
                    else 0.0) for a in a_row]
            values.append([v for v, _ in row])
            derivs.append([d for _, d in row])
        for mode in ("token-mean", "seq-mean-token-mean"):
            w = ref_agg_weights(case["mask"], mode)
            loss, grad, _ = loss_and_grad("gspo", case, loss_agg_mode=mode)
            assert_close(loss, (w * t64(values)).sum())
            assert_close(grad, w * t64(derivs))


def test_geo_mean_matches_reference():
    low, high = 0.2, 0.28
    for seed in SEEDS:
        case = random_case(seed, seq_adv=seed % 2 == 0)
        mask, rows = case["mask"].tolist(), []
        for lp_row, o_row, a_row, m_row in zip(case["new"].tolist(), case["old"].tolist(), case["adv"].tolist(), mask):
            xs, ds = [], []
            for lp, o, a in zip(lp_row, o_row, a_row):
                x = lp - o
                if a > 0:
                    xs.append(min(x, high)), ds.append(1.0 if x < high else 0.0)
                else:  # a < 0 (a random advantage is never 0)
                    xs.append(max(x, -low)), ds.append(1.0 if x > -low else 0.0)
            n = sum(m_row) + 1e-8
            rho = math.exp(sum(x * m for x, m in zip(xs, m_row)) / n)
            a_bar = sum(a * m for a, m in zip(a_row, m_row)) / n
            rows.append((-a_bar * rho, [-a_bar * rho * m / n * d for m, d in zip(m_row, ds)]))
        n_seqs = max(sum(1 for m in mask if sum(m) > 0), 1)
        loss, grad, _ = loss_and_grad("geo_mean", case, clip_ratio_low=low, clip_ratio_high=high)
        assert_close(loss, sum(v for v, _ in rows) / n_seqs)
        assert_close(grad, t64([d for _, d in rows]) / n_seqs)


def cov_of(case):
    """verl's cov over the valid tokens: (A − mean A)·(logπ − mean logπ)."""
    valid = case["mask"].bool()
    a, lp = case["adv"][valid], case["new"][valid]
    return (a - a.mean()) * (lp - lp.mean()), valid


def test_clip_cov_matches_reference_when_every_candidate_is_dropped():
    for seed in SEEDS:
        case = random_case(seed)
        if not case["mask"].any():
            continue
        cov, valid = cov_of(case)
        vanilla_vals, vanilla_d = per_token(ref_vanilla, case, c=1e9)
        r = torch.exp(case["new"] - case["old"])
        clipped = -case["adv"] * r.clamp(0.8, 1.2) > -case["adv"] * r
        keep = torch.ones_like(case["mask"])
        drop = (cov > -0.5) & (cov < 0.5) & ~clipped[valid]
        keep[valid] = 1.0 - drop.to(F64)
        w = ref_agg_weights(case["mask"], "token-mean")
        # clip_cov_ratio = 1: the cap ⌊ratio·N⌋ ≥ #candidates, so the random pick takes them all
        loss, grad, m = loss_and_grad("clip_cov", case, clip_cov_ratio=1.0, clip_cov_lb=-0.5, clip_cov_ub=0.5)
        assert_close(loss, (w * vanilla_vals * keep).sum())
        assert_close(grad, w * vanilla_d * keep)
        assert_close(m["pg_clipfrac"], drop.to(F64).mean())


def test_clip_cov_picks_at_most_its_share_reproducibly():
    case = random_case(3)
    case.update(mask=torch.ones(6, 50, dtype=F64), new=-5 * torch.rand(6, 50, dtype=F64),
                old=-5 * torch.rand(6, 50, dtype=F64), adv=torch.randn(6, 50, dtype=F64))
    kw = dict(clip_cov_ratio=0.02, clip_cov_lb=-10.0, clip_cov_ub=10.0)
    _, g1, m1 = loss_and_grad("clip_cov", case, generator=torch.Generator().manual_seed(1), **kw)
    _, g2, _ = loss_and_grad("clip_cov", case, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(g1, g2)
    assert m1["pg_clipfrac"].item() == pytest.approx(6 / 300)  # ⌊0.02·300⌋ tokens


def test_kl_cov_matches_reference():
    for seed in SEEDS:
        case = random_case(seed)
        ratio, coef = 0.3, 0.1
        plain, plain_d = per_token(lambda lp, o, a: (-a * math.exp(lp - o), -a * math.exp(lp - o)), case)
        penalty = (case["new"] - case["old"]).abs()
        penalty_d = torch.sign(case["new"] - case["old"])
        chosen = torch.zeros_like(case["mask"])
        if case["mask"].any():
            cov, valid = cov_of(case)
            k = max(1, int(cov.numel() * ratio))
            flat = sorted(range(cov.numel()), key=lambda j: -cov[j].item())[:k]
            picked = torch.zeros(cov.numel(), dtype=F64)
            picked[flat] = 1.0
            chosen[valid] = picked
        w = ref_agg_weights(case["mask"], "token-mean")
        loss, grad, m = loss_and_grad("kl_cov", case, kl_cov_ratio=ratio, ppo_kl_coef=coef)
        assert_close(loss, (w * (plain + coef * chosen * penalty)).sum())
        assert_close(grad, w * (plain_d + coef * chosen * penalty_d))


# --- rollout correction and bypass_mode --------------------------------------------------------------------

def ref_is_weights(log_ratio, mask, level, upper, lower=None):
    out = []
    for x_row, m_row in zip(log_ratio.tolist(), mask.tolist()):
        seq = sum(x * m for x, m in zip(x_row, m_row))
        row = []
        for x, m in zip(x_row, m_row):
            raw = math.exp(max(-20, min(20, seq if level == "sequence" else x))) * m
            row.append(min(raw, upper) if lower is None else (raw if lower <= raw <= upper else 0.0))
        out.append(row)
    return t64(out)


def test_is_weights_and_rejection_hand_worked():
    log_ratio, mask = t64([[math.log(3.0), 0.0, math.log(0.5)]]), t64([[1, 1, 1]])
    assert_close(is_weights(log_ratio, mask, "token", 2.0), [[2.0, 1.0, 0.5]])  # TIS at 2
    assert_close(is_weights(log_ratio, mask, "token", "0.6_2.5"), [[0.0, 1.0, 0.0]])  # IcePop
    assert_close(is_weights(log_ratio, mask, "sequence", 2.0), [[1.5, 1.5, 1.5]])  # 3·1·0.5
    # token_k1 with ratio bounds [0.6, 2.5]: keep log 0.6 ≤ −log ρ ≤ log 2.5, i.e. ρ ∈ [0.4, 1.67]
    assert rejection_mask(log_ratio, mask, "token_k1", "0.6_2.5").tolist() == [[0.0, 1.0, 1.0]]
    # seq_max_k2: max ½(log ρ)² = ½·log²3 = 0.603 > 0.5 drops the whole sequence
    assert rejection_mask(log_ratio, mask, "seq_max_k2", 0.5).tolist() == [[0.0, 0.0, 0.0]]
    assert rejection_mask(log_ratio, mask, "token_k2,seq_mean_k3", "0.5,1.0").tolist() == [[0.0, 1.0, 1.0]]


def test_is_weights_match_reference():
    for seed in SEEDS:
        case = random_case(seed)
        lr = case["new"] - case["old"]
        for level in ("token", "sequence"):
            assert_close(is_weights(lr, case["mask"], level, 2.0), ref_is_weights(lr, case["mask"], level, 2.0))
            assert_close(is_weights(lr, case["mask"], level, "0.5_3"),
                         ref_is_weights(lr, case["mask"], level, 3.0, 0.5))


@pytest.mark.parametrize("loss_type", ["ppo_clip", "reinforce"])
def test_bypass_mode_matches_reference(loss_type):
    corr = dict(loss_type=loss_type, rollout_is="token", rollout_is_threshold=2.0, rollout_rs="token_k3",
                rollout_rs_threshold=0.5)
    for seed in SEEDS:
        case = random_case(seed)
        if not case["mask"].any():
            continue
        lr = case["new"] - case["old"]
        keep = case["mask"] * (torch.exp(lr) - 1 - lr <= 0.5)
        w = ref_agg_weights(keep, "token-mean")
        if loss_type == "ppo_clip":
            values, derivs = per_token(ref_vanilla, case)
        else:
            weights = ref_is_weights(lr, case["mask"], "token", 2.0)
            values, derivs = -case["adv"] * case["new"] * weights, -case["adv"] * weights
        loss, grad, metrics = loss_and_grad("bypass_mode", case, rollout_correction=corr)
        assert_close(loss, (w * values).sum())
        assert_close(grad, w * derivs)
        assert "rollout_corr/rollout_rs_masked_fraction" in metrics


# --- edge cases: fully masked batches, extreme ratios --------------------------------------------------------

LOSS_KW = {"dro": {"dro_beta": 0.1}, "bypass_mode": {"rollout_correction": {"rollout_is": "sequence"}},
           "clip_cov": {"clip_cov_ratio": 1.0, "clip_cov_lb": -1.0, "clip_cov_ub": 1.0}}  # drops deterministic
ALL_LOSSES = ["vanilla", "gspo", "gpg", "cispo", "sapo", "dppo_tv", "dppo_kl", "geo_mean", "dro", "clip_cov",
              "kl_cov", "bypass_mode"]


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_every_loss_is_finite_and_ignores_fully_masked_rows(name):
    g = torch.Generator().manual_seed(7)
    old, new = -5 * torch.rand(3, 4, generator=g, dtype=F64), -5 * torch.rand(3, 4, generator=g, dtype=F64)
    adv = torch.randn(3, 1, generator=g, dtype=F64).expand(3, 4).contiguous()
    mask = t64([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 0]])
    kw = LOSS_KW.get(name, {})
    base = dict(old=old, new=new, adv=adv, mask=mask)
    loss, grad, metrics = loss_and_grad(name, base, **kw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())
    assert not grad[mask == 0].any()  # padding and the empty row get no gradient
    keep = mask.sum(-1) > 0
    trimmed = dict(old=old[keep], new=new[keep], adv=adv[keep], mask=mask[keep])
    assert_close(loss, loss_and_grad(name, trimmed, **kw)[0])  # an empty row changes nothing


def test_vanilla_hand_worked_at_log_ratio_5():
    old, mask = torch.zeros(1, 2, dtype=F64), torch.ones(1, 2, dtype=F64)
    lp = t64([[5.0, -5.0]]).requires_grad_()
    loss, m = compute_policy_loss("vanilla", old_log_prob=old, log_prob=lp, advantages=t64([[1.0, -1.0]]),
                                  response_mask=mask)
    loss.backward()
    # token 0: A = 1, r = e⁵ clipped to 1.2 → −1.2, no gradient; token 1: A = −1, r = e⁻⁵ clipped to 0.8 → 0.8
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert lp.grad.tolist() == [[0.0, 0.0]]
    assert m["pg_clipfrac"].item() == 1.0


# --- advantage estimators ------------------------------------------------------------------------------------

def ref_group_scalars(case, fn):
    scores, out = scores_of(case), [0.0] * len(case["index"])
    for members in groups_of(case["index"]):
        for i in members:
            out[i] = fn(scores[i], [scores[j] for j in members], scores)
    return t64(out).unsqueeze(-1) * case["mask"]


def std(xs):
    mu = sum(xs) / len(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def grpo_rule(s, group, _):
    return s / (1 + 1e-6) if len(group) == 1 else (s - sum(group) / len(group)) / (std(group) + 1e-6)


def rloo_rule(single):
    return lambda s, group, _: single(s) if len(group) == 1 else (s - sum(group) / len(group)) * len(group) / (
        len(group) - 1)


def gpg_rule(s, group, all_scores):
    alpha = len(all_scores) / max(sum(1 for x in all_scores if x != 0), 1)
    return alpha * (s - (0.0 if len(group) == 1 else sum(group) / len(group)))


def dr_grpo_rule(s, group, _):
    return s if len(group) == 1 else s - sum(group) / len(group)


@pytest.mark.parametrize("name,norm,rule", [
    ("grpo", True, grpo_rule), ("grpo", False, dr_grpo_rule),
    ("grpo_vectorized", False, grpo_rule),  # verl's trainer gives the std flag to grpo only
    ("rloo", True, rloo_rule(lambda s: s)), ("rloo_vectorized", True, rloo_rule(lambda s: 0.0)),
    ("gpg", True, gpg_rule)])
def test_group_estimators_match_reference(name, norm, rule):
    for seed in SEEDS:
        case = with_rewards(random_case(seed))
        adv, returns = compute_advantages(name, token_level_rewards=case["rew"], response_mask=case["mask"],
                                          index=case["index"], norm_adv_by_std_in_grpo=norm)
        assert_close(adv, ref_group_scalars(case, rule))
        assert torch.equal(adv, returns)


def test_vectorized_aliases_equal_verls_loop_forms():
    for seed in SEEDS:
        case = with_rewards(random_case(seed))
        kw = dict(token_level_rewards=case["rew"], response_mask=case["mask"], index=case["index"])
        assert torch.equal(compute_advantages("grpo_vectorized", **kw)[0], compute_advantages("grpo", **kw)[0])
        singles = {k for k in case["index"] if case["index"].count(k) == 1}
        rows = [i for i, k in enumerate(case["index"]) if k not in singles]
        assert_close(compute_advantages("rloo_vectorized", **kw)[0][rows], compute_advantages("rloo", **kw)[0][rows])


def test_grpo_passk_hand_worked_and_reference():
    rewards = t64([[0, 3], [0, 1], [0, 2], [0, 5], [0, 5]])
    adv, _ = compute_advantages("grpo_passk", token_level_rewards=rewards, response_mask=torch.ones(5, 2, dtype=F64),
                                index=["a", "a", "a", "b", "b"], norm_adv_by_std_in_grpo=False)
    assert adv[:, 0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]  # 3 − 2; a tie at the top gives 0
    with pytest.raises(ValueError, match="at least 2 samples"):
        compute_advantages("grpo_passk", token_level_rewards=rewards[:1], response_mask=torch.ones(1, 2), index=["a"])
    for seed in SEEDS:
        case = with_rewards(random_case(seed))
        case["index"] = [i // 2 for i in range(len(case["index"]))][::-1]
        if len(case["index"]) % 2:
            continue
        case["rew"] = case["rew"] + torch.rand(case["rew"].shape, generator=case["g"], dtype=F64) * case["mask"]

        def rule(s, group, _):
            top = sorted(group, reverse=True)
            return (top[0] - top[1]) / (std(group) + 1e-6) if s == top[0] else 0.0

        adv, _ = compute_advantages("grpo_passk", token_level_rewards=case["rew"], response_mask=case["mask"],
                                    index=case["index"])
        assert_close(adv, ref_group_scalars(case, rule))


def test_gdpo_matches_reference():
    for seed in SEEDS:
        case = with_rewards(random_case(seed))
        if case["mask"].sum() < 2:
            continue
        b = len(case["index"])
        comps = {"fmt": torch.randn(b, generator=case["g"], dtype=F64), "acc": torch.randn(b, generator=case["g"],
                                                                                          dtype=F64)}
        adv, _ = compute_advantages("gdpo", token_level_rewards=case["rew"], response_mask=case["mask"],
                                    index=case["index"], reward_components=comps, reward_weights=[0.3, 1.0],
                                    norm_adv_by_std_in_grpo=False)
        total = sum(w * ref_group_scalars({**case, "rew": c.unsqueeze(-1) * torch.ones_like(case["mask"][:, :1]),
                                           "mask": torch.ones(b, 1, dtype=F64)}, grpo_rule) * case["mask"]
                    for w, c in zip([0.3, 1.0], comps.values()))
        assert_close(adv, ref_whiten(total, case["mask"]) * case["mask"])


def otb_case(seed):
    case = with_rewards(random_case(seed))
    g = case["g"]
    case["pi2"] = torch.rand(case["mask"].shape, generator=g, dtype=F64)
    case["rho"] = 0.5 + torch.rand(case["mask"].shape, generator=g, dtype=F64)
    return case


def ref_otb(case, packed: bool, rho=None):
    """verl's OTB: returns G, path weights W, then per group and per step (position, or k-th valid token)."""
    mask, rew = case["mask"].tolist(), case["rew"].tolist()
    w_tok = (1 - 2 * torch.exp(case["old"]) + case["pi2"]) * (1 if rho is None else rho**2)
    G, W = [], []
    for r_row, w_row, m_row in zip(rew, w_tok.tolist(), mask):
        g_row = [sum(r * m for r, m in zip(r_row[t:], m_row[t:])) for t in range(len(r_row))]
        w_cum = [sum(w * m for w, m in zip(w_row[:t + 1], m_row[:t + 1])) for t in range(len(w_row))]
        G.append(g_row), W.append(w_cum)
    adv = [[0.0] * len(row) for row in mask]
    for members in groups_of(case["index"]):
        pos = {i: [t for t, m in enumerate(mask[i]) if m] if packed else list(range(len(mask[i]))) for i in members}
        valid = {i: [bool(mask[i][t]) for t in pos[i]] for i in members}
        live = [i for i in members if sum(mask[i]) > 0] if packed else members
        lengths = {i: int(sum(mask[i])) for i in live}
        for i in members:
            for k, t in enumerate(pos[i]):
                if not valid[i][k]:
                    continue
                base = 0.0
                if len(live) > 1:
                    num = sum(G[j][pos[j][k]] * W[j][pos[j][k]] for j in live if k < len(pos[j]) and valid[j][k])
                    den = sum(W[j][pos[j][k]] for j in live if k < len(pos[j]) and valid[j][k]) + 1e-8
                    base = num / den
                    ordered = sorted(lengths.values())
                    longest = [j for j in live if lengths[j] == ordered[-1]]
                    if len(longest) == 1 and ordered[-1] > ordered[-2] and i == longest[0] and k >= ordered[-2]:
                        base = 0.0
                adv[i][t] = G[i][t] - base
    return t64(adv), t64(G)


@pytest.mark.parametrize("name,packed", [("optimal_token_baseline", False), ("tir_optimal_token_baseline", True)])
def test_optimal_token_baselines_match_reference(name, packed):
    for seed in SEEDS:
        case = otb_case(seed)
        for rho in (None, case["rho"]):
            adv, returns = compute_advantages(name, token_level_rewards=case["rew"], response_mask=case["mask"],
                                              index=case["index"], old_log_probs=case["old"],
                                              sum_pi_squared=case["pi2"], rollout_is_weights=rho)
            ref_adv, ref_returns = ref_otb(case, packed, rho)
            assert_close(adv, ref_adv)
            assert_close(returns * case["mask"], ref_returns * case["mask"])


def test_optimal_token_baseline_hand_worked_and_needs_its_inputs():
    # one group of two, lengths 1 and 2, π = 1/2 and Σπ² = 1/2: w = 1 − 1 + 1/2 = 1/2 per token
    rewards, mask = t64([[1, 0], [0, 3]]), t64([[1, 0], [1, 1]])
    half = torch.full((2, 2), math.log(0.5), dtype=F64)
    adv, _ = compute_advantages("optimal_token_baseline", token_level_rewards=rewards, response_mask=mask,
                                index=[0, 0], old_log_probs=half, sum_pi_squared=torch.full((2, 2), 0.5, dtype=F64))
    # t = 0: G = (1, 3), W = (½, ½) → B = 2; t = 1: the longer row alone past length 1 → zero tail, A = G = 3
    assert_close(adv, [[-1.0, 0.0], [1.0, 3.0]], tol=1e-7)
    with pytest.raises(ValueError, match="sum_pi_squared"):
        compute_advantages("optimal_token_baseline", token_level_rewards=rewards, response_mask=mask, index=[0, 0])


# --- config keys -------------------------------------------------------------------------------------------

def test_policy_loss_kwargs_reads_verls_keys():
    actor = {"clip_ratio": 0.2, "tau_pos": 1.0, "tau_neg": 1.05, "loss_scale_factor": None,
             "policy_loss": {"loss_mode": "kl_cov", "clip_cov_ratio": 0.0002, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0,
                             "kl_cov_ratio": 0.001, "ppo_kl_coef": 0.1, "dro_beta": None}}
    kwargs = policy_loss_kwargs(actor, {"rollout_correction": {"rollout_is": "token", "loss_type": "reinforce"}})
    assert kwargs == {"clip_ratio": 0.2, "tau_pos": 1.0, "tau_neg": 1.05, "clip_cov_ratio": 0.0002, "clip_cov_lb": 1.0,
                      "clip_cov_ub": 5.0, "kl_cov_ratio": 0.001, "ppo_kl_coef": 0.1,
                      "rollout_correction": {"rollout_is": "token", "loss_type": "reinforce"}}
    case = random_case(11)
    # every loss accepts the whole set (the actor passes the same keywords to each)
    for name in ALL_LOSSES:
        extra = {"dro_beta": 0.1} if name == "dro" else {}
        loss_and_grad(name, case, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, **kwargs, **extra)

"""Reward routing, verl's gsm8k rule, math-verify, custom functions, and failure isolation."""

import time

import pytest

from ascend_rl.errors import UserError
from ascend_rl.reward import RewardFunction, RewardRunner, default_compute_score, load_custom_reward_fn, scorer_for
from ascend_rl.reward.scorers import gsm8k_extract


@pytest.mark.parametrize("text,method,expected", [
    ("so #### 1,234 and then #### 72", "strict", "72"),
    ("the answer is $1,000", "strict", None),
    ("the answer is 1,000.", "flexible", "1,000."),
    ("#### $5", "strict", None),  # verl's strict pattern wants a number right after '#### '
    ("x" * 400 + "#### 9", "strict", "9"),
    ("#### 9" + "x" * 400, "strict", None),  # only the last 300 characters are read
])
def test_gsm8k_extraction_like_verl(text, method, expected):
    assert gsm8k_extract(text, method) == expected


def test_routing_by_data_source():
    assert default_compute_score("openai/gsm8k", "… #### 72", "72") == 1.0
    assert default_compute_score("openai/gsm8k", "72", "72") == 0.0  # strict needs the '####' format
    assert default_compute_score("arithmetic", "19", "19") == 1.0
    assert default_compute_score("arithmetic", "1 9", "19") == 0.0
    assert default_compute_score("HuggingFaceH4/MATH-500", r"so \boxed{\frac{1}{2}}", r"0.5") == 1.0
    assert default_compute_score("lighteval/MATH", r"\boxed{3}", "4") == 0.0
    assert default_compute_score("aime_2024", "…\nAnswer: 204", "204") == {"score": 1.0, "acc": 1.0}
    assert default_compute_score("math_dapo", "Answer: 7", "204") == {"score": -1.0, "acc": 0.0}
    with pytest.raises(KeyError, match="no scorer for data_source 'mystery'"):
        scorer_for("mystery")


CUSTOM = """
import time
def compute_score(data_source, solution_str, ground_truth, extra_info=None, bonus=0.0):
    if solution_str == "raise":
        raise RuntimeError("boom")
    if solution_str == "hang":
        time.sleep(60)
    return {"score": float(solution_str == ground_truth) + bonus, "length": len(solution_str)}
"""


def test_custom_function_loading_errors(tmp_path):
    with pytest.raises(UserError, match=r"reward.custom_reward_function.path=.*absent.py: no such file"):
        load_custom_reward_fn(str(tmp_path / "absent.py"))
    (tmp_path / "r.py").write_text(CUSTOM)
    with pytest.raises(UserError, match="reward.custom_reward_function.name=score: .*r.py defines no function 'score'"):
        load_custom_reward_fn(str(tmp_path / "r.py"), "score")
    (tmp_path / "broken.py").write_text("import not_a_module\n")
    with pytest.raises(UserError, match="importing it failed: ModuleNotFoundError"):
        load_custom_reward_fn(str(tmp_path / "broken.py"))


def test_runner_isolates_raising_and_hanging_scorers(tmp_path):
    (tmp_path / "r.py").write_text(CUSTOM)
    reward = RewardFunction(str(tmp_path / "r.py"), "compute_score", {"bonus": 0.5})
    with RewardRunner(reward, num_workers=2, timeout_s=1.0) as runner:
        start = time.monotonic()
        out = runner.score(["x"] * 4, ["a", "raise", "hang", "b"], ["a", "a", "a", "a"])
        assert time.monotonic() - start < 10
        assert [s.score for s in out] == [1.5, 0.0, 0.0, 0.5]
        assert out[0].extra == {"length": 1.0}
        assert out[1].error == "RuntimeError: boom"
        assert out[2].error == "timeout"
        # the pool was replaced after the hang; the runner still works
        assert [s.score for s in runner.score(["x"], ["a"], ["a"])] == [1.5]


def test_runner_default_routing_and_unknown_source():
    with RewardRunner(RewardFunction(), num_workers=1, timeout_s=5.0) as runner:
        out = runner.score(["arithmetic", "mystery"], ["12", "12"], ["12", "12"])
    assert out[0].score == 1.0
    assert out[1].score == 0.0 and "no scorer for data_source 'mystery'" in out[1].error


def test_samples_queued_behind_a_hung_scorer_are_still_scored(tmp_path):
    (tmp_path / "r.py").write_text(CUSTOM)
    with RewardRunner(RewardFunction(str(tmp_path / "r.py")), num_workers=1, timeout_s=0.5) as runner:
        start = time.monotonic()
        out = runner.score(["x"] * 5, ["hang", "a", "a", "hang", "a"], ["a"] * 5)
    assert [s.error for s in out] == ["timeout", None, None, "timeout", None]
    assert [s.score for s in out] == [0.0, 1.0, 1.0, 0.0, 1.0]
    assert time.monotonic() - start < 10

"""Reward routing, verl's gsm8k rule, math-verify, custom functions, and failure isolation."""

import logging
import multiprocessing
import os
import signal
import time

import pytest

from ascend_rl.errors import UserError
from ascend_rl.reward import (
    RewardFunction,
    RewardRunner,
    ScoredSample,
    default_compute_score,
    failure_summary,
    load_custom_reward_fn,
    log_failures,
    scorer_for,
)
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
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(UserError, match=r"reward.custom_reward_function.path=.*exits.py: importing it failed: "
                                        r"SystemExit: 3$"):
        load_custom_reward_fn(str(tmp_path / "exits.py"))


def test_runner_isolates_raising_and_hanging_scorers(tmp_path):
    (tmp_path / "r.py").write_text(CUSTOM)
    reward = RewardFunction(str(tmp_path / "r.py"), "compute_score", {"bonus": 0.5})
    with RewardRunner(reward, num_workers=2, timeout_s=1.0) as runner:
        start = time.monotonic()
        out = runner.score(["x"] * 4, ["a", "raise", "hang", "b"], ["a", "a", "a", "a"])
        assert time.monotonic() - start < 10
        assert [s.score for s in out] == [1.5, 0.0, 0.0, 0.5]
        assert out[0].extra == {"length": 1.0}
        assert out[1].error == "RuntimeError: boom (compute_score)"
        assert out[2].error == "timeout after 1 s (compute_score)"
        # the hung worker was replaced; the runner still works
        assert [s.score for s in runner.score(["x"], ["a"], ["a"])] == [1.5]


def test_runner_default_routing_and_unknown_source():
    with RewardRunner(RewardFunction(), num_workers=1, timeout_s=5.0) as runner:
        out = runner.score(["arithmetic", "mystery"], ["12", "12"], ["12", "12"])
    assert out[0].score == 1.0
    assert out[1].score == 0.0 and "no scorer for data_source 'mystery'" in out[1].error
    assert out[1].error.endswith("(default_compute_score)")


def test_samples_queued_behind_a_hung_scorer_are_still_scored(tmp_path):
    (tmp_path / "r.py").write_text(CUSTOM)
    with RewardRunner(RewardFunction(str(tmp_path / "r.py")), num_workers=1, timeout_s=0.5) as runner:
        start = time.monotonic()
        out = runner.score(["x"] * 5, ["hang", "a", "a", "hang", "a"], ["a"] * 5)
    assert [s.error for s in out] == ["timeout after 0.5 s (compute_score)", None, None,
                                      "timeout after 0.5 s (compute_score)", None]
    assert [s.score for s in out] == [0.0, 1.0, 1.0, 0.0, 1.0]
    assert time.monotonic() - start < 4  # two timeouts of 0.5 s, one after the other


def test_a_hung_scorer_costs_only_its_own_timeout(tmp_path):
    (tmp_path / "r.py").write_text(CUSTOM)
    with RewardRunner(RewardFunction(str(tmp_path / "r.py")), num_workers=2, timeout_s=2.0) as runner:
        runner.score(["x"], ["a"], ["a"])  # the workers are up
        start = time.monotonic()
        out = runner.score(["x"] * 9, ["hang"] + ["a"] * 8, ["a"] * 9)
        elapsed = time.monotonic() - start
    assert [s.score for s in out] == [0.0] + [1.0] * 8
    assert 2.0 <= elapsed < 5.0  # the other worker scored the rest meanwhile


DYING = """
import os, signal, sys
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    if solution_str == "die":
        print("about to die")
        os._exit(1)
    if solution_str == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if solution_str == "exit":
        sys.exit(3)
    if solution_str == "exit()":
        sys.exit()
    return float(solution_str == ground_truth)
"""


def test_a_dying_scorer_costs_only_its_sample_and_no_timeout(tmp_path):
    (tmp_path / "r.py").write_text(DYING)
    with RewardRunner(RewardFunction(str(tmp_path / "r.py")), num_workers=2, timeout_s=10.0) as runner:
        start = time.monotonic()
        out = runner.score(["x"] * 8, ["a", "die", "a", "die", "b", "kill", "a", "die"], ["a"] * 8)
        assert time.monotonic() - start < 3.0  # was 8 × 10 s before: every queued sample waited the full timeout
        assert [s.score for s in out] == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        assert [s.error for s in out if s.error] == ["worker died with exit code 1 (compute_score)"] * 2 + [
            "worker killed by SIGKILL (out of memory?) (compute_score)", "worker died with exit code 1 (compute_score)"]
        assert out[1].output == "about to die"
        out = runner.score(["x"] * 3, ["exit", "exit()", "a"], ["a"] * 3)  # sys.exit is caught in the worker
        assert [(s.score, s.error) for s in out] == [
            (0.0, "SystemExit: 3 (compute_score)"), (0.0, "SystemExit (compute_score)"), (1.0, None)]


CHATTY = """
import os, sys, time
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    print("scoring", solution_str)
    if solution_str == "raise":
        raise ValueError("bad")
    if solution_str == "hang":
        time.sleep(60)
    if solution_str == "swallow":  # catches the alarm's exception and hangs on: only the backstop ends it
        while True:
            try:
                time.sleep(60)
            except BaseException:
                pass
    if solution_str == "die":
        os._exit(1)
    return float(solution_str == ground_truth)
"""


def test_chunks_keep_every_failure_to_its_own_sample(tmp_path):
    """Enough samples to go in chunks: a raising, a hung and a dying sample each cost themselves only, with the
    output they printed (not their chunk's); the rest score."""
    (tmp_path / "r.py").write_text(CHATTY)
    answers = ["a"] * 40
    answers[3], answers[17], answers[30] = "raise", "hang", "die"
    with RewardRunner(RewardFunction(str(tmp_path / "r.py")), num_workers=2, timeout_s=1.0) as runner:
        start = time.monotonic()
        out = runner.score(["x"] * 40, answers, ["a"] * 40)
        elapsed = time.monotonic() - start
    assert [s.score for s in out] == [0.0 if i in (3, 17, 30) else 1.0 for i in range(40)]
    assert (out[3].error, out[3].output) == ("ValueError: bad (compute_score)", "scoring raise")
    assert (out[17].error, out[17].output) == ("timeout after 1 s (compute_score)", "scoring hang")
    assert out[30].error == "worker died with exit code 1 (compute_score)"
    assert elapsed < 6.0  # one alarm of 1 s; the dead chunk's samples once more, one task each


def test_a_scorer_that_swallows_the_alarm_is_stopped_by_the_backstop(tmp_path):
    (tmp_path / "r.py").write_text(CHATTY)
    answers = ["a"] * 20
    answers[5] = "swallow"
    with RewardRunner(RewardFunction(str(tmp_path / "r.py")), num_workers=2, timeout_s=0.5) as runner:
        out = runner.score(["x"] * 20, answers, ["a"] * 20)
    assert [s.score for s in out] == [0.0 if i == 5 else 1.0 for i in range(20)]
    assert out[5].error == "timeout after 0.5 s (compute_score)"


def test_a_worker_killed_while_idle_does_not_break_the_next_batch(tmp_path):
    (tmp_path / "r.py").write_text(DYING)
    with RewardRunner(RewardFunction(str(tmp_path / "r.py")), num_workers=2, timeout_s=10.0) as runner:
        assert [s.score for s in runner.score(["x"] * 2, ["a", "b"], ["a"] * 2)] == [1.0, 0.0]
        for worker in multiprocessing.active_children():  # pebble gives a pool up when a worker dies idle
            if worker.name == "pebble_pool_worker":
                os.kill(worker.pid, signal.SIGKILL)
        time.sleep(0.5)
        assert [s.score for s in runner.score(["x"] * 2, ["a", "b"], ["a"] * 2)] == [1.0, 0.0]


RETURNS = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return eval(solution_str)
"""


def test_scores_that_are_not_finite_numbers_are_failures(tmp_path):
    (tmp_path / "r.py").write_text(RETURNS)
    cases = {
        "1": (1.0, None), "0.25": (0.25, None), "True": (1.0, None),  # a bool is 0/1, as in verl
        "{'score': 0.5, 'acc': 1}": (0.5, None),
        "None": (0.0, "TypeError: returned None (NoneType), not a number"),
        "'1.0'": (0.0, "TypeError: returned '1.0' (str), not a number"),
        "[1.0]": (0.0, "TypeError: returned [1.0] (list), not a number"),
        "float('nan')": (0.0, "ValueError: returned nan"),
        "float('-inf')": (0.0, "ValueError: returned -inf"),
        "{'score': 'high'}": (0.0, "TypeError: returned score 'high' (str), not a number"),
        "{'score': float('inf')}": (0.0, "ValueError: returned score inf"),
        "{'acc': 1.0}": (0.0, "ValueError: returned a dict without 'score': ['acc']"),
    }
    with RewardRunner(RewardFunction(str(tmp_path / "r.py")), num_workers=2, timeout_s=10.0) as runner:
        out = runner.score(["x"] * len(cases), list(cases), [None] * len(cases))
    got = [(s.score, s.error and s.error.removesuffix(" (compute_score)")) for s in out]
    assert got == list(cases.values())
    assert out[3].extra == {"acc": 1.0}


NOISY = """
import os, sys
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    for i in range(20_000):
        print(f"line {i} " + "x" * 100)
    os.write(2, b"C-level " * 100_000 + b"\\n")
    print("the last words", file=sys.stderr)
    if solution_str == "raise":
        raise ValueError("bad answer")
    return 1.0
"""


def test_scorer_output_is_captured_and_kept_short(tmp_path, capfd):
    (tmp_path / "r.py").write_text(NOISY)
    with RewardRunner(RewardFunction(str(tmp_path / "r.py")), num_workers=2, timeout_s=10.0) as runner:
        out = runner.score(["x"] * 3, ["ok", "raise", "ok"], [None] * 3)
    console = capfd.readouterr()
    assert len(console.out) + len(console.err) < 1000  # 2 MB per sample printed, none of it on the console
    assert [s.score for s in out] == [1.0, 0.0, 1.0]
    assert [s.output for s in out] == ["", out[1].output, ""]  # kept for failures only
    assert out[1].error == "ValueError: bad answer (compute_score)"
    assert out[1].output.startswith("…") and out[1].output.endswith("C-level C-level | the last words")
    assert len(out[1].output) == 301


def test_failure_summary_counts_reasons_and_logs_them_once(caplog):
    scored = [ScoredSample(1.0, {})] + [ScoredSample(0.0, {}, "ValueError: bad answer (compute_score)", "why")] * 3 + [
        ScoredSample(0.0, {}, f"KeyError: {k} (compute_score)") for k in "abc"] + [
        ScoredSample(0.0, {}, "timeout after 10 s (compute_score)")] * 2
    assert failure_summary(scored) == ["3× ValueError: bad answer (compute_score); it printed: why",
                                       "2× timeout after 10 s (compute_score)", "1× KeyError: a (compute_score)",
                                       "and 2 other reason(s)"]
    assert failure_summary(scored[:1]) == []
    with caplog.at_level(logging.WARNING, logger="ascend_rl.reward"):
        assert log_failures(scored[:1]) == 0
        assert caplog.records == []
        assert log_failures(scored) == 8
    [record] = caplog.records
    assert record.levelno == logging.WARNING and record.name == "ascend_rl.reward.runner"
    assert record.getMessage().startswith("8 of 9 reward(s) failed and scored 0: 3× ValueError: bad answer")


def test_tasks_the_pool_loses_are_rerun_once_then_failed(tmp_path, monkeypatch):
    from concurrent.futures import Future

    import ascend_rl.reward.runner as runner_module

    (tmp_path / "r.py").write_text(CUSTOM)
    schedule, lost, lose = runner_module.ProcessPool.schedule, [], 1

    def schedule_losing(pool, fn, args, timeout):  # pebble loses a task whose worker dies before starting it
        samples = args[0] if fn is runner_module._score_chunk else [args[0]]
        if any(sample[1] == "lost" for sample in samples) and len(lost) < lose:
            lost.append(args)
            return Future()
        return schedule(pool, fn, args, timeout=timeout)

    monkeypatch.setattr(runner_module.ProcessPool, "schedule", schedule_losing)
    monkeypatch.setattr(runner_module, "_LOST_AFTER_S", 0.2)
    with RewardRunner(RewardFunction(str(tmp_path / "r.py")), num_workers=2, timeout_s=0.3) as runner:
        out = runner.score(["x"] * 3, ["a", "lost", "a"], ["a", "lost", "a"])
        assert [s.score for s in out] == [1.0, 1.0, 1.0] and len(lost) == 1  # scored again in a fresh pool
        lose = 3
        out = runner.score(["x"] * 3, ["a", "lost", "a"], ["a", "lost", "a"])
        assert [(s.score, s.error) for s in out] == [
            (1.0, None), (0.0, "no result from the scorer pool, twice (compute_score)"), (1.0, None)]


def test_validation_reports_verls_core_and_aux_values():
    """verl: `acc` is the headline when present (a plain-number score is its own acc), else `reward`; every
    other numeric key a scorer returns is reported under val-aux."""
    from ascend_rl.trainer.validation import sample_values

    assert sample_values(0.5, {}) == {"reward": 0.5, "acc": 0.5}
    assert sample_values(1.0, {"acc": True, "format_ok": 0.0, "note": "x"}) == {"reward": 1.0, "acc": 1.0,
                                                                               "format_ok": 0.0}
    assert sample_values(0.2, {"format_ok": 1}) == {"reward": 0.2, "format_ok": 1.0}

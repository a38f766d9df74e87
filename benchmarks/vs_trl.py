"""GRPO side by side with TRL's GRPOTrainer on this machine: the same SFT-warmed tiny model, arithmetic data
and settings (64 prompts × n=8 per step, 16 new tokens at most, lr 3e-4 constant, no KL, temperature 1,
clip 0.2, one optimizer step per step, token-mean loss, group-normalised advantages), the same thread count,
both runs of a seed started one after the other in this process's run. Needs TRL (`pip install -e .[bench]`).

    .venv/bin/python benchmarks/vs_trl.py --seeds 1 2 3 --steps 40 --threads 2

Reports per framework: seconds per step (median after 3 warm-up steps), samples/s, generated tokens/s, time
split, held-out greedy accuracy (the same evaluator for both: our engine, greedy, on the 200 held-out prompts)
against steps and wall-clock seconds (evaluation time excluded), and for our update phase the achieved FLOP/s
against a plain matmul at the same thread count. Writes benchmarks/results/vs_trl.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACC = "val-core/arithmetic/acc/mean@1"
PROMPTS, N, MAX_NEW, LR = 64, 8, 16, 3e-4
WARMUP = 3


BF16 = ["actor_rollout_ref.actor.fsdp_config.dtype=bfloat16", "actor_rollout_ref.ref.fsdp_config.dtype=bfloat16",
        "actor_rollout_ref.rollout.dtype=bfloat16"]  # ours with --bf16 (TRL: bf16=True)


def embedded_cfg(seed: int, steps: int, eval_every: int, out: Path, bf16: bool = False):
    from ascend_rl.config.loader import load_config

    return load_config([*(BF16 if bf16 else []),
        f"trainer.seed={seed}", f"trainer.total_training_steps={steps}", f"trainer.test_freq={eval_every}",
        f"trainer.default_local_dir={out}", "trainer.logger=[console]", "trainer.val_before_train=True",
        f"data.train_batch_size={PROMPTS}", f"data.max_response_length={MAX_NEW}",
        f"actor_rollout_ref.rollout.n={N}", f"actor_rollout_ref.actor.ppo_mini_batch_size={PROMPTS}",
        # one forward/backward of the whole batch, as TRL's per_device_train_batch_size below
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={PROMPTS * N}",
        f"actor_rollout_ref.actor.optim.lr={LR}", "actor_rollout_ref.actor.optim.lr_scheduler_type=constant",
    ])


# --- workers (each in its own process, with the thread count set before torch starts) --------------------

def worker_assets(seed: int, **_) -> dict:
    from ascend_rl.trainer.embedded import ensure_embedded_assets

    ensure_embedded_assets(seed)
    return {}


def worker_ours(seed: int, steps: int, eval_every: int, out: Path, bf16: bool = False, **_) -> dict:
    from ascend_rl.trainer.components import build_components
    from ascend_rl.trainer.loop import RLTrainer

    RLTrainer(build_components(embedded_cfg(seed, steps, eval_every, out, bf16), show_progress=False)).fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "timing_s/step" in r]
    wall, curve = 0.0, []
    for r in rows:  # validation runs outside the timed step, so the clock below excludes it
        wall += r.get("timing_s/step", 0.0)
        if r.get(ACC) is not None:
            curve.append((r["step"], wall, r[ACC]))
    params = sum(p.numel() for p in _model(seed).parameters())
    return {
        "step_s": [r["timing_s/step"] for r in steps_rows],
        "gen_s": [r["timing_s/gen"] for r in steps_rows],
        "logprob_s": [r.get("timing_s/old_log_prob", 0.0) for r in steps_rows],  # 0: on-policy, none needed
        "update_s": [r["timing_s/update_actor"] for r in steps_rows],
        "sync_s": [r["timing_s/update_weights"] for r in steps_rows],
        "tokens": [r["response_length/mean"] * PROMPTS * N for r in steps_rows],
        "seq_tokens": [(r["response_length/mean"] + r["prompt_length/mean"]) * PROMPTS * N for r in steps_rows],
        # what the update computes: with shared prefixes (the CPU preset's use_prefix_grouper) each prompt once
        "computed_tokens": [r["prompt_length/mean"] * PROMPTS + r["response_length/mean"] * PROMPTS * N
                            for r in steps_rows],
        "params": params, "curve": curve,
    }


def _model(seed: int):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(embedded_cfg(seed, 1, 0, Path("unused")).actor_rollout_ref.model.path)


class _Evaluator:
    """Our greedy validation on the held-out prompts, for a model being trained elsewhere (TRL)."""

    def __init__(self, cfg):
        from transformers import AutoTokenizer

        from ascend_rl.data.dataset import load_prompts
        from ascend_rl.reward import RewardFunction, RewardRunner

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.actor_rollout_ref.model.path)
        self.records = load_prompts([cfg.data.val_files], self.tokenizer, cfg.data.max_prompt_length)
        self.rewards = RewardRunner(RewardFunction(None, None, {}), num_workers=1)

    def __call__(self, model) -> float:
        from ascend_rl.rollout.native import NativeEngine
        from ascend_rl.trainer.validation import run_validation

        was_training = model.training
        engine = NativeEngine(model, [self.tokenizer.eos_token_id], self.tokenizer.pad_token_id)
        acc = run_validation(engine, self.records, lambda ids: self.tokenizer.batch_decode(ids, skip_special_tokens=True),
                             self.rewards, self.cfg.actor_rollout_ref.rollout.val_kwargs, MAX_NEW, seed=0)[ACC]
        model.train(was_training)
        return acc


def worker_trl(seed: int, steps: int, eval_every: int, out: Path, bf16: bool = False, **_) -> dict:
    import pyarrow.parquet as pq
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from ascend_rl.reward.scorers import scorer_for

    cfg = embedded_cfg(seed, steps, eval_every, out)
    model_path = cfg.actor_rollout_ref.model.path
    rows = pq.read_table(cfg.data.train_files).to_pylist()
    data = Dataset.from_list([{"prompt": r["prompt"], "ground_truth": r["reward_model"]["ground_truth"]} for r in rows])
    score = scorer_for("arithmetic")  # the scorer our trainer uses for this data

    def reward(prompts, completions, ground_truth, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [score(t, gt) for t, gt in zip(texts, ground_truth)]

    gen_seconds = []
    original_generate = transformers.GenerationMixin.generate

    def timed_generate(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original_generate(self, *args, **kwargs)
        finally:
            gen_seconds.append(time.perf_counter() - start)

    transformers.GenerationMixin.generate = timed_generate
    evaluate = _Evaluator(cfg)
    clock = {"eval_s": 0.0, "start": None, "steps": [], "curve": []}

    class Measure(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            clock["curve"].append((0, 0.0, evaluate(model)))
            clock["start"] = clock["last"] = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            now = time.perf_counter()
            clock["steps"].append(now - clock["last"])
            if state.global_step % eval_every == 0 or state.global_step == steps:
                wall = now - clock["start"] - clock["eval_s"]
                t0 = time.perf_counter()
                clock["curve"].append((state.global_step, wall, evaluate(model)))
                clock["eval_s"] += time.perf_counter() - t0
            clock["last"] = time.perf_counter()

    lengths = []

    class Lengths(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    config = GRPOConfig(
        output_dir=str(out), num_generations=N, per_device_train_batch_size=PROMPTS * N,
        gradient_accumulation_steps=1, steps_per_generation=1, max_completion_length=MAX_NEW, learning_rate=LR,
        lr_scheduler_type="constant", beta=0.0, epsilon=0.2, temperature=1.0, num_iterations=1, max_steps=steps,
        logging_steps=1, report_to="none", use_cpu=True, seed=seed, save_strategy="no", loss_type="dapo",
        scale_rewards="group", disable_dropout=True, bf16=bf16)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_path), reward_funcs=reward, args=config,
                          train_dataset=data, processing_class=AutoTokenizer.from_pretrained(model_path),
                          callbacks=[Measure(), Lengths()])
    trainer.train()
    return {"step_s": clock["steps"], "gen_s": gen_seconds[:len(clock["steps"])],
            "tokens": [m * PROMPTS * N for m in lengths[:len(clock["steps"])]], "curve": clock["curve"]}


def matmul_gflops(threads: int, size: int = 1024, repeats: int = 20) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


WORKERS = {"assets": worker_assets, "ours": worker_ours, "trl": worker_trl}


def run_worker(kind: str, seed: int, steps: int, eval_every: int, threads: int, cache: Path, out: Path,
               bf16: bool = False) -> dict:
    env = {**os.environ, "ASCEND_RL_CACHE": str(cache), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    result = out / f"{kind}.json"
    cmd = [sys.executable, __file__, "--worker", kind, "--seeds", str(seed), "--steps", str(steps),
           "--eval-every", str(eval_every), "--threads", str(threads), "--out", str(out), *(["--bf16"] if bf16 else [])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def summarize(run: dict) -> dict:
    step = statistics.median(run["step_s"][WARMUP:])
    tokens = statistics.median(run["tokens"][WARMUP:])
    out = {"step_s": step, "samples_per_s": PROMPTS * N / step, "tokens_per_s": tokens / step,
           "gen_s": statistics.median(run["gen_s"][WARMUP:]), "acc_start": run["curve"][0][2],
           "acc_end": run["curve"][-1][2], "curve": run["curve"]}
    for key in ("logprob_s", "update_s", "sync_s"):
        if key in run:
            out[key] = statistics.median(run[key][WARMUP:])
    if "params" in run:  # forward + backward ≈ 6 FLOPs per parameter per token (prompt and response)
        for name, tokens in (("update_gflops", "seq_tokens"), ("update_computed_gflops", "computed_tokens")):
            out[name] = 6 * run["params"] * statistics.median(run[tokens][WARMUP:]) / out["update_s"] / 1e9
    return out


def write_report(results: dict, args, ceiling: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = args.report
    out.with_suffix(".json").write_text(json.dumps({"matmul_gflops": ceiling, "results": results}, indent=1))
    command = ['benchmarks/vs_trl.py', '--seeds', *map(str, args.seeds), '--steps', str(args.steps), '--threads',
               str(args.threads), *(['--bf16', '--report', str(args.report)] if args.bf16 else [])]
    precision = "bf16 (ours: actor, reference and rollout dtype bfloat16; TRL: bf16=True)" if args.bf16 else "fp32"
    lines = [f"`{' '.join(command)}` on the 2-core dev machine, {args.threads} threads, {precision}; medians over "
             f"steps {WARMUP + 1}–{args.steps}.", "",
             "| seed | framework | s/step | samples/s | gen tokens/s | generation s | log-prob s | update s | weight sync s "
             "| held-out acc start → end |", "|---|---|---|---|---|---|---|---|---|---|"]
    for seed, pair in results.items():
        for name in ("ours", "trl"):
            r = pair[name]
            split = " | ".join(f"{r[k]:.2f}" if k in r else "–" for k in ("logprob_s", "update_s", "sync_s"))
            lines.append(f"| {seed} | {name} | {r['step_s']:.2f} | {r['samples_per_s']:.0f} | {r['tokens_per_s']:.0f} | "
                         f"{r['gen_s']:.2f} | {split} | {r['acc_start']:.3f} → {r['acc_end']:.3f} |")
    ratios = [pair["ours"]["samples_per_s"] / pair["trl"]["samples_per_s"] for pair in results.values()]
    flops, computed = ([pair["ours"][k] for pair in results.values()] for k in ("update_gflops", "update_computed_gflops"))
    lines += ["", f"Samples per second, ours / TRL: {', '.join(f'{r:.2f}×' for r in ratios)} (seeds "
              f"{', '.join(map(str, results))}).",
              f"Our update phase: {statistics.median(flops):.2f} GFLOP/s as rows of prompt and response would cost "
              f"(6 · parameters · tokens / update time); {statistics.median(computed):.2f} GFLOP/s computed (shared "
              f"prefixes compute each prompt once); against {ceiling:.1f} GFLOP/s for a 1024² fp32 matmul at "
              f"{args.threads} threads ({100 * statistics.median(computed) / ceiling:.1f} % of that ceiling)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for color, (seed, pair) in zip(("C0", "C1", "C2", "C3", "C4"), results.items()):
        for name, style in (("ours", "-o"), ("trl", "--s")):
            curve = pair[name]["curve"]
            ax.plot([c[1] for c in curve], [c[2] for c in curve], style, color=color,
                    label=f"{'ascend-rl' if name == 'ours' else 'TRL'}, seed {seed}")
    ax.set(xlabel="wall-clock seconds of training (evaluation excluded)", ylabel="held-out greedy accuracy",
           ylim=(0, 1), title=f"GRPO on arithmetic, tiny Qwen3: ascend-rl vs TRL ({args.threads} threads)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ascend-rl-vs-trl"))
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks" / "results" / "vs_trl")
    parser.add_argument("--worker", choices=sorted(WORKERS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from the .json")
    parser.add_argument("--bf16", action="store_true", help="both frameworks compute in bf16")
    args = parser.parse_args()
    if args.report_only:
        saved = json.loads(args.report.with_suffix(".json").read_text())
        write_report(saved["results"], args, saved["matmul_gflops"])
        return
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        args.out.mkdir(parents=True, exist_ok=True)
        result = WORKERS[args.worker](seed=args.seeds[0], steps=args.steps, eval_every=args.eval_every, out=args.out,
                                      bf16=args.bf16)
        (args.out / f"{args.worker}.json").write_text(json.dumps(result))
        return
    results = {}
    args.work.mkdir(parents=True, exist_ok=True)
    runs = Path(tempfile.mkdtemp(prefix="runs-", dir=args.work))  # fresh: a finished run there would be resumed
    for seed in args.seeds:
        cache, work = args.work / f"cache-{seed}", runs / f"seed-{seed}"
        run_worker("assets", seed, args.steps, args.eval_every, args.threads, cache, work / "assets")
        pair = {}
        for name in ("ours", "trl"):  # one after the other, same machine state as far as we can make it
            pair[name] = summarize(run_worker(name, seed, args.steps, args.eval_every, args.threads, cache, work / name,
                                              args.bf16))
            print(f"seed {seed} {name}: {pair[name]['step_s']:.2f} s/step, acc {pair[name]['acc_start']:.3f} → "
                  f"{pair[name]['acc_end']:.3f}", flush=True)
        results[seed] = pair
    args.report.parent.mkdir(parents=True, exist_ok=True)
    write_report(results, args, matmul_gflops(args.threads))


if __name__ == "__main__":
    main()

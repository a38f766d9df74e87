"""The machine and the summary of scripts/device_check.sh (markdown and JSON), from what its steps left.

    python scripts/device_summary.py machine WORK/machine.json       # GPU, driver, CUDA, torch, Python, date
    python scripts/device_summary.py write --work WORK --out OUT_DIR  # OUT_DIR/summary.md, OUT_DIR/summary.json

`write` reads WORK/steps.tsv (name, exit code, seconds, budget per step; the log is OUT_DIR/NAME.log),
WORK/machine.json, WORK/pytest.xml (JUnit, with the properties the cuda tests record), the embedded run's
WORK/embedded/metrics.jsonl and OUT_DIR/bench.json. Whatever a step did not leave is reported as missing; a failed
step comes with its log's tail.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAIL_LINES = 40
TIMED_OUT = (124, 137)  # timeout's exit codes: the limit, and the kill after it


def machine_info() -> dict:
    import torch

    info = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "commit": _commit()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if smi.returncode == 0:
            info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


# --- the steps -------------------------------------------------------------------------------------------------

def read_steps(work: Path, out: Path) -> list[dict]:
    steps = []
    path = work / "steps.tsv"
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, code, seconds, budget = line.split("\t")
        code = int(code)
        status = "passed" if code == 0 else "timed out" if code in TIMED_OUT else f"failed (exit {code})"
        step = {"name": name, "status": status, "exit_code": code, "seconds": float(seconds), "budget": int(budget)}
        if code != 0:
            step["tail"] = tail(out / f"{name}.log")
        steps.append(step)
    return steps


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    if not path.is_file():
        return f"(no log: {path.name})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --- pytest -m cuda --------------------------------------------------------------------------------------------

def read_pytest(path: Path) -> dict | None:
    """Each test's outcome, time, first message line and recorded properties, from a JUnit file (xunit1)."""
    if not path.is_file():
        return None
    tests, counts = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "xfailed": 0, "xpassed": 0}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = ("failed" if child.tag == "failure" else "error"), child.get("message", "")
            elif child.tag == "skipped":
                xfail = child.get("type") == "pytest.xfail"
                outcome, message = ("xfailed" if xfail else "skipped"), child.get("message", "")
        counts[outcome] += 1
        properties = {p.get("name"): _number(p.get("value")) for p in case.iter("property")}
        tests.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time") or 0),
                      "message": message.splitlines()[0][:300] if message else "", "properties": properties})
    return {"counts": {k: v for k, v in counts.items() if v}, "tests": tests}


def _number(text: str | None):
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


# --- the embedded default on the GPU ---------------------------------------------------------------------------

VAL_KEY = "val-core/arithmetic/acc/mean@1"


def read_train(run_dir: Path, log: Path, wanted_steps: int) -> dict | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "timing_s/step" in r]
    validations = [(r.get("step", 0), r[VAL_KEY]) for r in rows if VAL_KEY in r]

    def median(key):
        values = [r[key] for r in steps if key in r]
        return statistics.median(values) if values else None

    summary_line = next((line for line in reversed(log.read_text(errors="replace").splitlines())
                         if line.startswith("validation accuracy before")), None) if log.is_file() else None
    return {"steps": len(steps), "wanted_steps": wanted_steps, "median_step_s": median("timing_s/step"),
            "median_gen_s": median("timing_s/gen"), "median_update_actor_s": median("timing_s/update_actor"),
            "median_throughput": median("perf/throughput"),
            "logprob_diff_max": max((r["rollout/logprob_diff_max"] for r in steps
                                     if "rollout/logprob_diff_max" in r), default=None),
            "score_first": steps[0].get("critic/score/mean") if steps else None,
            "score_last": steps[-1].get("critic/score/mean") if steps else None,
            "validation": validations, "summary_line": summary_line}


# --- writing ---------------------------------------------------------------------------------------------------

def rollout_markdown():
    """benchmarks/rollout_gpu.py's table, one renderer for both."""
    if "rollout_gpu" not in sys.modules:  # registered first: its dataclass looks its module up
        spec = importlib.util.spec_from_file_location("rollout_gpu", ROOT / "benchmarks" / "rollout_gpu.py")
        sys.modules["rollout_gpu"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["rollout_gpu"])
    return sys.modules["rollout_gpu"].markdown


def collect(work: Path, out: Path, wanted_steps: int) -> dict:
    machine = json.loads((work / "machine.json").read_text()) if (work / "machine.json").is_file() else {}
    bench = json.loads((out / "bench.json").read_text()) if (out / "bench.json").is_file() else None
    return {"date": machine.get("date") or datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine, "steps": read_steps(work, out), "pytest": read_pytest(work / "pytest.xml"),
            "train": read_train(work / "embedded", out / "train.log", wanted_steps), "bench": bench}


def fmt(value, spec=".3g", missing="–") -> str:
    return missing if value is None else format(value, spec)


def markdown(s: dict) -> str:
    m = s["machine"]
    gpu = m.get("gpu") or ("no CUDA device" if m else "unknown (the machine step left nothing)")
    lines = [f"# GPU check ({s['date']})", "",
             f"Machine: {gpu}" + (f", {m['gpu_memory_gib']} GiB" if m.get("gpu_memory_gib") else "")
             + (f"; nvidia-smi: {m['nvidia_smi']}" if m.get("nvidia_smi") else "")
             + f"; torch {m.get('torch', '?')}, CUDA {m.get('cuda', '?')}, Python {m.get('python', '?')}; "
               f"commit {m.get('commit', 'unknown')}.", "",
             "| step | status | seconds | budget |", "|---|---|---|---|"]
    lines += [f"| {st['name']} | {st['status']} | {st['seconds']:.0f} | {st['budget']} |" for st in s["steps"]]
    if not s["steps"]:
        lines.append("| (no step recorded) | | | |")

    lines += ["", "## pytest -m cuda", ""]
    pytest = s["pytest"]
    if pytest is None:
        lines.append("No JUnit report (the step did not finish): see pytest.log.")
    else:
        lines.append(", ".join(f"{v} {k}" for k, v in pytest["counts"].items()) or "no tests")
        lines += ["", "| test | outcome | seconds | measured / message |", "|---|---|---|---|"]
        for t in pytest["tests"]:
            measured = ", ".join(f"{k} = {fmt(v)}" if isinstance(v, float) else f"{k} = {v}"
                                 for k, v in t["properties"].items())
            lines.append(f"| {t['name']} | {t['outcome']} | {t['seconds']:.1f} | "
                         f"{'; '.join(x for x in (measured, t['message']) if x).replace('|', '/')} |")

    lines += ["", "## The embedded default, trainer.device=cuda", ""]
    train = s["train"]
    if train is None:
        lines.append("No metrics.jsonl (the run did not reach its first step): see train.log.")
    else:
        val = " → ".join(f"{acc:.3f} (step {step})" for step, acc in train["validation"]) or "–"
        lines += [f"- steps: {train['steps']} of {train['wanted_steps']}; median s/step {fmt(train['median_step_s'])} "
                  f"(generation {fmt(train['median_gen_s'])}, actor update {fmt(train['median_update_actor_s'])}); "
                  f"throughput {fmt(train['median_throughput'], ',.0f')} tokens/s",
                  f"- held-out greedy accuracy: {val}",
                  f"- training score: {fmt(train['score_first'])} (step 1) → {fmt(train['score_last'])} (last)",
                  f"- engine vs trainer log-probs, largest |diff| over the steps: {fmt(train['logprob_diff_max'])}"]
        if train["summary_line"]:
            lines.append(f"- `{train['summary_line']}`")

    lines += ["", "## Rollout benchmark (benchmarks/rollout_gpu.py)", ""]
    if s["bench"] is None:
        lines.append("No bench.json (the step did not start measuring): see bench.log.")
    else:
        lines.append(rollout_markdown()(s["bench"]).rstrip())

    failed = [st for st in s["steps"] if st["exit_code"] != 0]
    if failed:
        lines += ["", "## Failed steps"]
        for st in failed:
            lines += ["", f"### {st['name']}: {st['status']}", "", "```", st["tail"], "```"]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("machine").add_argument("path", type=Path)
    write = sub.add_parser("write")
    write.add_argument("--work", type=Path, required=True)
    write.add_argument("--out", type=Path, required=True)
    write.add_argument("--train-steps", type=int, default=30)
    args = parser.parse_args(argv)
    if args.command == "machine":
        info = machine_info()
        args.path.write_text(json.dumps(info, indent=1))
        print(json.dumps(info, indent=1))
        return 0 if info["cuda_available"] else 1
    summary = collect(args.work, args.out, args.train_steps)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    text = markdown(summary)
    (args.out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

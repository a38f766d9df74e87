"""scripts/device_check.sh off the GPU: its dry run (the steps, their time limits, the wheel list against the GPU
image, never a torch), the dependency checks that guard the install, the summary it writes from what the steps
left, and the GPU rollout benchmark on a tiny model on this CPU."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_check.sh"


def load(relative: str):
    """A script as a module (registered first: dataclasses look their module up)."""
    name = Path(relative).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / relative)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


deps = load("scripts/device_deps.py")


def carried_wheels() -> list[str]:
    out = subprocess.run(["bash", str(SCRIPT), "--list-wheels"], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_the_dry_run_shows_every_step_within_eight_minutes_and_installs_no_torch(tmp_path):
    out_dir = tmp_path / "out"
    run = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out_dir)], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(tmp_path)}, timeout=120)
    assert run.returncode == 0, run.stderr
    text = run.stdout
    steps = re.findall(r"^step (\w+) \((\d+) s\)$", text, re.M)
    assert [name for name, _ in steps] == ["machine", "install", "pytest", "train", "bench", "summary"]
    assert sum(int(seconds) for _, seconds in steps) <= 480
    commands = [line.strip()[2:] for line in text.splitlines() if line.startswith("    $ ")]
    assert any("-m pytest -m cuda tests/test_cuda.py" in c for c in commands)
    assert any("-m ascend_rl train" in c and "trainer.device=cuda" in c and "trainer.total_training_steps=30" in c
               for c in commands)
    assert any("benchmarks/rollout_gpu.py --device cuda --size 100m" in c for c in commands)
    installs = [c for c in commands if " pip install " in c]
    assert installs and all("--no-index" in c for c in installs)  # nothing can come from anywhere but .whl/
    assert any("--no-deps" in c and c.endswith("-e .") for c in installs)
    # the wheel list meets every requirement on the GPU image, and neither it nor pip would bring a torch
    assert "ok: every requirement is met" in text
    carried = next(line for line in text.splitlines() if line.startswith("carried wheels the requirements use:"))
    assert "omegaconf==" in carried and not re.search(r"\btorch", carried)
    if (ROOT / ".whl").is_dir():  # fetched (scripts/device_wheels.sh): pip's own dry run, as for the GPU machine
        pip_would = next(line for line in text.splitlines() if line.startswith("pip would install:"))
        assert "omegaconf==" in pip_would and not re.search(r"\btorch", pip_would)
    else:
        assert "no .whl/ here: bash scripts/device_wheels.sh fetches it; pip's dry run skipped" in text
    assert not out_dir.exists()  # a dry run writes nothing


def test_the_wheel_list_meets_the_requirements_on_the_gpu_image():
    plan = deps.plan(carried_wheels(), ROOT / ".whl", simulate_machine=True)
    assert plan.problems == []
    assert set(plan.carried) >= {"hydra-core", "omegaconf", "antlr4-python3-runtime", "tensordict", "pydantic-core"}
    assert plan.machine["torch"] == "2.11.0" and plan.machine["transformers"] == "5.17.0"


@pytest.mark.parametrize("change,problem", [
    (lambda w: w + ["torch==2.13.0"], "torch==2.13.0 is carried: the machine's own torch must stay"),
    (lambda w: [s for s in w if not s.startswith("omegaconf")],
     "omegaconf>=2.3 (needed by ascend-rl) is neither carried nor on the machine"),
    (lambda w: [s if not s.startswith("hydra-core") else "hydra-core==1.2.0" for s in w],
     "ascend-rl needs hydra-core>=1.3, but hydra-core==1.2.0 is carried"),
])
def test_a_wrong_wheel_list_is_named(change, problem):
    plan = deps.plan(change(carried_wheels()), ROOT / ".whl", simulate_machine=True)
    assert problem in plan.problems


def test_a_carried_wheels_own_requirements_are_followed_from_its_metadata(tmp_path):
    import zipfile

    wheels = tmp_path / "whl"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "hydra_core-1.3.8-py3-none-any.whl", "w") as wheel:
        wheel.writestr("hydra_core-1.3.8.dist-info/METADATA",
                       "Metadata-Version: 2.1\nName: hydra-core\nVersion: 1.3.8\n"
                       "Requires-Dist: omegaconf<2.4,>=2.2\nRequires-Dist: antlr4-python3-runtime==4.9.*\n"
                       "Requires-Dist: packaging\nRequires-Dist: importlib-resources; python_version < \"3.9\"\n")
    plan = deps.plan(["hydra-core==1.3.8", "omegaconf==2.3.0"], wheels, simulate_machine=True,
                     requirements=["hydra-core>=1.3", "torch>=2.7.1"])
    # omegaconf 2.3.0 has no wheel here and is not installed here: its own requirements are not followed, said so
    assert plan.problems == ["antlr4-python3-runtime==4.9.* (needed by hydra-core) is neither carried nor on the "
                             "machine"]
    assert plan.carried == {"hydra-core": "1.3.8", "omegaconf": "2.3.0"}
    assert plan.machine == {"torch": "2.11.0", "packaging": "?"}  # importlib-resources: only below Python 3.9
    assert any(note.startswith("omegaconf==2.3.0: no wheel") for note in plan.notes)
    # on the machine itself (here: this interpreter) what is installed counts, and a carried wheel must be there
    here = deps.plan(["omegaconf==2.3.0"], wheels, simulate_machine=False,
                     requirements=["omegaconf>=99", "no-such-package-anywhere>=1"])
    assert set(here.problems) == {
        "omegaconf==2.3.0: no wheel in .whl/ (bash scripts/device_wheels.sh) and not installed here",
        "ascend-rl needs omegaconf>=99, but omegaconf==2.3.0 is carried",
        "no-such-package-anywhere>=1 (needed by ascend-rl) is neither carried nor on the machine"}


def test_a_pip_dry_run_that_would_replace_torch_is_refused(tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"install": [{"metadata": {"name": "omegaconf", "version": "2.3.1"}},
                                              {"metadata": {"name": "torch", "version": "2.13.0"}}]}))
    assert deps.main(["pip-report", str(report)]) == 1
    captured = capsys.readouterr()
    assert "pip would install: omegaconf==2.3.1, torch==2.13.0" in captured.out
    assert "error: pip would replace the machine's torch==2.13.0: refusing" in captured.err
    report.write_text(json.dumps({"install": [{"metadata": {"name": "omegaconf", "version": "2.3.1"}}]}))
    assert deps.main(["pip-report", str(report)]) == 0
    assert deps.protected("nvidia-nccl-cu13") and deps.protected("Torch") and not deps.protected("transformers")


JUNIT_SOURCE = '''
import pytest

def test_measures(record_property):
    record_property("fp32_logprob_diff_max", 4.8e-07)

def test_breaks():
    assert 1 == 2, "engine and trainer differ"

def test_skips():
    pytest.skip("needs a CUDA GPU")

@pytest.mark.xfail(strict=True, reason="known")
def test_known():
    assert False
'''


def make_work(tmp_path: Path) -> tuple[Path, Path]:
    """What the steps leave: their exit codes, the machine, a real JUnit file, a short run's metrics, a log."""
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "embedded").mkdir(parents=True)
    out.mkdir()
    (work / "steps.tsv").write_text("machine\t0\t3.2\t15\ninstall\t0\t9.0\t45\npytest\t1\t80.5\t170\n"
                                    "train\t124\t130.0\t130\nbench\t0\t61.0\t95\n")
    (work / "machine.json").write_text(json.dumps({"date": "2026-12-02 10:00 UTC", "gpu": "NVIDIA H200",
                                                   "gpu_memory_gib": 139.8, "torch": "2.11.0+cu130", "cuda": "13.0",
                                                   "python": "3.12.3", "commit": "abc1234"}))
    tests = tmp_path / "junit_case"
    tests.mkdir()
    (tests / "test_case.py").write_text(JUNIT_SOURCE)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
                    f"--junitxml={work / 'pytest.xml'}", str(tests)], capture_output=True, cwd=tests, timeout=120)
    rows = [{"step": 0, "val-core/arithmetic/acc/mean@1": 0.3}]
    rows += [{"step": s, "timing_s/step": 0.5 + s / 10, "timing_s/gen": 0.1, "timing_s/update_actor": 0.3,
              "perf/throughput": 1000.0 * s, "critic/score/mean": 0.2 + s / 10, "rollout/logprob_diff_max": 1e-6 * s}
             for s in (1, 2, 3)]
    (work / "embedded" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (out / "train.log").write_text("".join(f"line {i}\n" for i in range(100)) + "killed at the time limit\n")
    return work, out


def test_the_summary_reports_each_step_test_and_measurement(tmp_path):
    summary_script = load("scripts/device_summary.py")
    work, out = make_work(tmp_path)
    bench = load("benchmarks/rollout_gpu.py")
    result = bench.Result("bf16", "rl", 512, 128, 128, "LeanStepper", 50_000.0, 20_000.0, 1_700_000.0,
                          50_000 / 1_700_000, 20_000 / 1_700_000, 3.5, 2)
    from dataclasses import asdict

    (out / "bench.json").write_text(json.dumps({"model": {"parameters": 100_094_208, "layers": 12, "hidden": 768,
                                                          "vocab": 32000}, "machine": {"device": "cuda",
                                                                                       "gpu": "NVIDIA H200"},
                                                "hbm_gbps": 4800.0, "results": [asdict(result)]}))
    assert summary_script.main(["write", "--work", str(work), "--out", str(out)]) == 0
    md, data = (out / "summary.md").read_text(), json.loads((out / "summary.json").read_text())
    assert "# GPU check (2026-12-02 10:00 UTC)" in md and "Machine: NVIDIA H200, 139.8 GiB" in md
    assert [(s["name"], s["status"]) for s in data["steps"]] == [
        ("machine", "passed"), ("install", "passed"), ("pytest", "failed (exit 1)"), ("train", "timed out"),
        ("bench", "passed")]
    assert data["pytest"]["counts"] == {"passed": 1, "failed": 1, "skipped": 1, "xfailed": 1}
    outcomes = {t["name"]: t for t in data["pytest"]["tests"]}
    assert outcomes["test_measures"]["properties"] == {"fp32_logprob_diff_max": 4.8e-07}
    assert "engine and trainer differ" in outcomes["test_breaks"]["message"]
    assert "| test_measures | passed |" in md and "fp32_logprob_diff_max = 4.8e-07" in md
    assert data["train"]["steps"] == 3 and data["train"]["median_step_s"] == pytest.approx(0.7)
    assert data["train"]["validation"] == [[0, 0.3]] and data["train"]["logprob_diff_max"] == pytest.approx(3e-6)
    assert "- steps: 3 of 30" in md
    assert "| bf16 | rl | 512 × (128 + 128) | LeanStepper | 50,000 | 20,000 | 2.50× | 1,700,000 | 2.94 % |" in md
    # a failed step comes with the end of its log
    assert "### train: timed out" in md and "killed at the time limit" in md and "line 99" in md
    assert "line 59" not in md  # only the tail
    assert data["steps"][3]["tail"].endswith("killed at the time limit")


def test_a_summary_of_steps_that_left_nothing_says_so(tmp_path):
    summary_script = load("scripts/device_summary.py")
    (tmp_path / "work").mkdir()
    (tmp_path / "out").mkdir()
    assert summary_script.main(["write", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "summary.md").read_text()
    for missing in ("(no step recorded)", "No JUnit report", "No metrics.jsonl", "No bench.json"):
        assert missing in md


def test_the_gpu_rollout_benchmark_runs_a_tiny_model_on_this_cpu(tmp_path):
    bench = load("benchmarks/rollout_gpu.py")
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--size", "tiny", "--dtypes", "fp32", "--repeats", "1", "--threads", "1",
                       "--json", str(out), "--markdown", str(tmp_path / "bench.md")]) == 0
    data = json.loads(out.read_text())
    assert [(r["dtype"], r["shape"]) for r in data["results"]] == [("fp32", "rl"), ("fp32", "decode")]
    for r in data["results"]:
        assert r["stepper"] == "LeanStepper" and r["repeats"] == 1
        assert r["native_tokens_per_s"] > 0 and r["transformers_tokens_per_s"] > 0
        assert 0 < r["native_fraction_of_bound"] < 1 and r["bound_tokens_per_s"] > r["native_tokens_per_s"]
    assert "| fp32 | rl | 8 × (16 + 8) | LeanStepper |" in (tmp_path / "bench.md").read_text()


def test_the_benchmarks_model_has_about_100m_parameters():
    bench = load("benchmarks/rollout_gpu.py")
    model = bench.build_model("100m", bench.DTYPES["bf16"], "meta")
    assert 95e6 < sum(p.numel() for p in model.parameters()) < 105e6

"""docs/tutorial.md, run as a reader would, in an empty directory: each ```python block that starts with
`# FILE` is written to FILE, each ```bash line runs in order (`ascend-rl serve` in the background), each
```json block must equal the first rows of the parquet file it shows. Only the number of RL steps is cut (FAST);
TUTORIAL_FULL=1 runs the page as written and checks its quoted outcome too."""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "tutorial.md"
FULL = os.environ.get("TUTORIAL_FULL") == "1"
FAST = {} if FULL else {"trainer.total_training_steps=100": "trainer.total_training_steps=3"}
DEFAULT_PORT = "127.0.0.1:30000"
RUN_DIR = Path("checkpoints/ascend_rl/reverse")
VAL_KEY = "val-core/reverse/acc/mean@1"


def blocks() -> list[tuple[str, str]]:
    """(language, text) of each fenced block, in order."""
    return re.findall(r"^```(\w+)\n(.*?)^```$", DOC.read_text(), re.S | re.M)


def bash_lines(text: str) -> list[str]:
    """The block's commands, continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", "", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def file_name(text: str) -> str | None:
    match = re.match(r"# (\S+\.py)\n", text)
    return match.group(1) if match else None


def test_the_page_is_what_the_runner_expects():
    """Cheap: the blocks parse, every command is one this file knows how to run, FAST's texts are in the page."""
    found = blocks()
    commands = [line for lang, text in found if lang == "bash" for line in bash_lines(text)]
    assert [line.split()[0] for line in commands if line.split()[0] not in ("python", "ascend-rl", "curl")] == []
    assert [lang for lang, text in found if lang == "python" and not file_name(text)] == []
    assert {lang for lang, _ in found} <= {"bash", "python", "json"}
    text = DOC.read_text()
    assert all(key in text for key in FAST) and DEFAULT_PORT in text
    assert sum(line.startswith("ascend-rl serve ") for line in commands) == 1
    assert any(line.startswith("ascend-rl train --config-name cpu ") for line in commands)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(port: int, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"ascend-rl serve not healthy after 120 s: {log.read_text()}")


def check_schema(work: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name in ("train", "test"):
        schema = pq.read_schema(work / f"{name}.parquet")
        message = pa.struct([("role", pa.string()), ("content", pa.string())])
        assert schema.field("prompt").type in (pa.list_(message), pa.large_list(message))
        assert schema.field("data_source").type == pa.string()
        assert schema.field("reward_model").type.get_field_index("ground_truth") >= 0
        assert pa.types.is_struct(schema.field("extra_info").type)
    sft = pq.read_schema(work / "sft.parquet")
    assert sft.names == ["prompt", "response"] and sft.field("response").type == pa.string()


def check_rows(work: Path, text: str) -> None:
    import pyarrow.parquet as pq

    shown = json.loads(text)
    name = "sft" if "response" in shown[0] else "train"
    assert pq.read_table(work / f"{name}.parquet").slice(0, len(shown)).to_pylist() == shown, name


def check_run(work: Path, steps: int) -> dict[int, float]:
    run = work / RUN_DIR
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    validated = {row["step"]: row[VAL_KEY] for row in rows if VAL_KEY in row}
    assert 0 in validated and steps in validated, validated  # before training and at the last step
    assert all(0 <= acc <= 1 for acc in validated.values())
    assert {row["step"] for row in rows if "critic/score/mean" in row} == set(range(1, steps + 1))
    assert (run / "curves.png").stat().st_size > 0 and list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "train.log").is_file() and (run / f"global_step_{steps}").is_dir()
    return validated


def check_export(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "reverse: abc"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]


@pytest.mark.slow
def test_the_tutorial_runs_as_written(tmp_path):
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    steps = int(re.search(r"trainer\.total_training_steps=(\d+)",
                          FAST.get("trainer.total_training_steps=100", "trainer.total_training_steps=100")).group(1))

    def adapt(text: str) -> str:
        for old, new in FAST.items():
            text = text.replace(old, new)
        return text.replace(DEFAULT_PORT, f"127.0.0.1:{port}")

    server, outputs = None, []
    log = tmp_path / "serve.log"
    try:
        for lang, text in blocks():
            if lang == "python":
                (tmp_path / file_name(text)).write_text(adapt(text))
            elif lang == "json":
                check_rows(tmp_path, text)
            for line in bash_lines(text) if lang == "bash" else []:
                line = adapt(line)
                if line.startswith("ascend-rl serve "):
                    with log.open("w") as sink:
                        server = subprocess.Popen([*shlex.split(line), "--port", str(port)], cwd=tmp_path, env=env,
                                                  stdout=sink, stderr=subprocess.STDOUT)
                    wait_healthy(port, server, log)
                    continue
                done = subprocess.run(line, shell=True, executable="/bin/bash", cwd=tmp_path, env=env,
                                      capture_output=True, text=True, timeout=300)
                assert done.returncode == 0, f"{line}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
                outputs.append((line, done))
                if line == "python make_data.py":
                    check_schema(tmp_path)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)

    def output(start: str) -> subprocess.CompletedProcess:
        (done,) = [done for line, done in outputs if line.startswith(start)]
        return done

    plan = output("ascend-rl plan ").stdout
    assert "16 prompts × n = 128 samples" in plan, plan
    assert not [line for line in plan.splitlines() if line.startswith(("error", "warning", "not built", "environment",
                                                                        "input"))], plan  # a clean plan
    assert "holdout exact match" in output("ascend-rl sft ").stderr
    validated = check_run(tmp_path, steps)
    shown = output("python show_metrics.py").stdout.splitlines()
    assert [int(line.split()[0]) for line in shown] == sorted(validated)
    check_export(tmp_path / "reverse-model")
    answer = json.loads(output("curl ").stdout)["choices"][0]["message"]["content"]
    assert output("python ask.py").stdout.strip() == answer.strip()  # the same greedy answer both ways
    if FULL:
        assert answer == "hcaeb" and validated[steps] >= 0.9

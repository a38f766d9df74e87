"""The Ascend quickstart in English and Chinese: the same commands in both, and every command is one of ours
and runs here (plan, doctor, the install script's dry run) or names a file that the tests check."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "docs" / "ascend" / "quickstart.md", ROOT / "docs" / "ascend" / "quickstart.zh.md"]


def commands(doc: Path) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_both_languages_have_the_same_commands():
    assert commands(DOCS[0]) == commands(DOCS[1])
    assert len(commands(DOCS[0])) >= 15


def run(argv: list[str], env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WORKSPACE_HOME": str(tmp_path), **env,
                "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(argv, env=full_env, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", commands(DOCS[0]))
def test_every_command_is_ours_and_runs(command, tmp_path):
    words = shlex.split(command)
    env = {}
    while words and re.match(r"^[A-Z_]+=", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    head = words[0]
    if head == "ascend-rl":
        out = run(words, env, tmp_path)
        assert out.returncode in (0, 1), out.stderr  # doctor answers 1 for problems found; 2 would be a usage error
        assert out.stdout.strip()
    elif head == "bash" and words[1].startswith("examples/ascend/"):
        out = run(words, env, tmp_path)
        assert out.returncode == 0, out.stderr
        assert "error:" not in out.stdout
    elif head == "bash" and words[1] == "scripts/install_sglang_npu.sh":
        out = run([*words[:2], "--dry-run"], env, tmp_path)
        assert out.returncode == 0 and "done (dry run)" in out.stdout, out.stderr
    elif head == "docker":
        dockerfile = words[words.index("-f") + 1]
        assert (ROOT / dockerfile).is_file(), dockerfile
    elif head == "source":
        assert words[1] in ("/usr/local/Ascend/ascend-toolkit/set_env.sh", "/usr/local/Ascend/nnal/atb/set_env.sh")
    elif head == "pip":  # the manual route is the install script's last step
        out = run(["bash", "scripts/install_sglang_npu.sh", "--dry-run"], {}, tmp_path)
        assert " ".join(words[1:]).replace(" .", "") in out.stdout.replace(f" '{ROOT}'", "").replace(f"'{ROOT}/", "")
    else:
        pytest.fail(f"not one of our commands: {command}")

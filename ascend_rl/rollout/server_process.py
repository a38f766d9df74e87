"""A rollout server run as a child process (`sglang.launch_server` or `ascend-rl serve`): started, waited
for until healthy, and stopped with its whole process group, also when the trainer fails."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from ascend_rl.errors import UserError
from ascend_rl.rollout.http_client import HttpEngineError, probe_health


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def cli_args(kwargs: dict) -> list[str]:
    """ServerArgs kwargs as `launch_server` flags: True → `--flag`; False and None → left out (SGLang's
    boolean flags are store_true with a False default); lists → several values; dicts → JSON."""
    import json

    argv = []
    for name, value in kwargs.items():
        flag = "--" + name.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


class ServerProcess:
    def __init__(self, argv: Sequence[str], url: str, log_path: Path, env: dict[str, str] | None = None):
        self.argv, self.url, self.log_path = list(argv), url, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **(env or {})}, start_new_session=True)

    def wait_until_healthy(self, timeout_s: float, poll_s: float = 0.5) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                self.close()
                raise UserError(f"rollout server exited with code {self.process.returncode} while starting "
                                f"({' '.join(self.argv[:4])} …); its log {self.log_path} ends with: {self.log_tail()}")
            try:
                probe_health(self.url, timeout_s=poll_s * 4)
                return
            except HttpEngineError:
                if time.monotonic() > deadline:
                    self.close()
                    raise UserError(f"rollout server at {self.url} not healthy after {timeout_s:.0f} s "
                                    f"(actor_rollout_ref.rollout.launch.startup_timeout_s); log: {self.log_path}") \
                        from None
                time.sleep(poll_s)

    def log_tail(self, lines: int = 3) -> str:
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(empty)"

    def close(self, grace_s: float = 10.0) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

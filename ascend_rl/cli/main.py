"""`ascend-rl <command>`: argument parsing and error reporting only; the work lives in the packages."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ascend_rl.cli import convert_cmd, data_cmd, doctor_cmd, export_cmd, plan_cmd, serve_cmd, sft_cmd, train_cmd
from ascend_rl.errors import UserError
from ascend_rl.platform import apply_cpu_thread_defaults

COMMANDS = {
    "train": (train_cmd, "run RL training (no arguments: the embedded tiny model and task on this machine)"),
    "plan": (plan_cmd, "resolve and check a config, print the device layout; needs no devices, models or data"),
    "sft": (sft_cmd, "supervised fine-tuning on prompt/response parquet (loss on the response only)"),
    "serve": (serve_cmd, "serve a model over HTTP with SGLang's endpoints (the native engine)"),
    "data": (data_cmd, "build the tiny model and datasets, convert GSM8K"),
    "export": (export_cmd, "copy a training checkpoint out as a Hugging Face model directory"),
    "convert": (convert_cmd, "convert a Hugging Face model to a Megatron dist checkpoint (verl's converter)"),
    "doctor": (doctor_cmd, "check this machine's software stack (Python, torch, torch_npu, CANN, driver, SGLang, "
                           "environment) and print the fix for each problem"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ascend-rl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


class _LevelPrefix(logging.Formatter):
    """`warning: ...` like the CLI's own messages; info lines plain."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test's capture, a redirect made after start-up)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


LOG_LEVEL_VAR = "ASCEND_RL_LOG_LEVEL"


def show_logs(environ=os.environ) -> None:
    """ascend-rl's own log lines on stderr, INFO and up unless ASCEND_RL_LOG_LEVEL says (DEBUG, WARNING, ...);
    other libraries keep their own settings."""
    logger = logging.getLogger("ascend_rl")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(_LevelPrefix())
        logger.addHandler(handler)
        level = environ.get(LOG_LEVEL_VAR, "INFO").upper()
        if not isinstance(logging.getLevelName(level), int):
            print(f"warning: {LOG_LEVEL_VAR}={environ[LOG_LEVEL_VAR]}: not a log level (DEBUG, INFO, WARNING, "
                  f"ERROR); using INFO", file=sys.stderr)
            level = "INFO"
        logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    apply_cpu_thread_defaults(os.environ)  # before any command imports torch
    show_logs()
    parser = build_parser()
    # parse_known_args: overrides may come after options (`train --no-progress a.b=1 c.d=2`), which a
    # plain nargs='*' positional does not allow.
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.run(args) or 0
    except UserError as err:
        for message in err.messages:
            print(f"error: {message}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine refused (disk full, permissions, a path that vanished): not a bug
        print(f"error: {err.strerror or err}" + (f": {err.filename}" if err.filename else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

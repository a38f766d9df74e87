"""Checks of a Hugging Face model directory before anything loads it, so a broken one is a one-line error
naming the file rather than a traceback from transformers, or, worse, a tokenizer that silently maps every
prompt to no tokens (what transformers gives for a directory without tokenizer files)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ascend_rl.errors import UserError, first_line

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
PROBE_TEXT = "Hello, world! 12+7=19"


def check_model_dir(path: str | Path, key: str, weights: bool = True) -> None:
    """config.json, weights (when `weights`) whose safetensors files are whole, in the directory `key` names."""
    where = Path(path)
    if not where.is_dir():
        raise UserError(f"{key}={path}: no such directory (models are not downloaded; pass a local Hugging Face "
                        f"model directory)")
    _check_config(where, key)
    if weights:
        _check_weights(where, key)


TOKENIZER_HINT = "copy the tokenizer files next to the model or set data.tokenizer"


def check_tokenizer(tokenizer, path: str | Path, key: str, hint: str = TOKENIZER_HINT) -> None:
    """A tokenizer that turns text into no ids (no tokenizer files in the directory) is refused."""
    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES) or not tokenizer(PROBE_TEXT)["input_ids"]:
        raise UserError(f"{key}={path}: no usable tokenizer (none of {', '.join(TOKENIZER_FILES)}; it encodes "
                        f"text as no tokens); {hint}")


def load_tokenizer(path: str | Path, key: str, hint: str = TOKENIZER_HINT):
    """`hint`: how to fix a missing tokenizer, in the words of the command that needs it."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # transformers raises many kinds for a broken tokenizer: all are the files' fault
        raise UserError(f"{key}={path}: cannot load the tokenizer: {type(err).__name__}: "
                        f"{first_line(err)}") from None
    check_tokenizer(tokenizer, path, key, hint)
    return tokenizer


def _check_config(where: Path, key: str) -> None:
    config = where / "config.json"
    try:
        parsed = json.loads(config.read_text())
    except FileNotFoundError:
        raise UserError(f"{key}={where}: no config.json (not a Hugging Face model directory)") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{config}: not valid JSON ({err})") from None
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        raise UserError(f"{config}: no model_type (a Hugging Face config.json names its architecture)")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(where)
    except Exception as err:  # an unknown model_type, wrong value types, ...
        raise UserError(f"{config}: transformers cannot read it: {first_line(err)}") from None


def _check_weights(where: Path, key: str) -> None:
    shards = sorted(where.glob("*.safetensors"))
    if not shards and not list(where.glob("pytorch_model*.bin")):
        raise UserError(f"{key}={where}: no weights (*.safetensors or pytorch_model*.bin)")
    index = where / "model.safetensors.index.json"
    if index.is_file():
        try:
            named = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{index}: unreadable ({type(err).__name__}: {err})") from None
        missing = sorted(name for name in named if not (where / name).is_file())
        if missing:
            raise UserError(f"{index}: names {missing[0]}, which is not in {where}"
                            + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""))
    for shard in shards:
        if problem := safetensors_problem(shard):
            raise UserError(f"{shard}: {problem}")


def safetensors_problem(path: Path) -> str | None:
    """Whether the file is as long as its own header says (truncation) and the header parses; reads only the
    header, so it costs nothing on a large checkpoint."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes: too short for a safetensors file"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"header of {length} bytes does not fit in the file ({size} bytes): truncated or not safetensors"
        try:
            header = json.loads(f.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "unreadable safetensors header"
    if size != 8 + length + end:
        return f"{size} bytes, but its header describes {8 + length + end}: truncated or damaged"
    return None


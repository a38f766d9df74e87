"""Parquet prompts → token ids: schema checks that name file, row and column; the chat template;
`filter_overlong_prompts`; `truncation` applied for real; `train_max_samples`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ascend_rl.errors import UserError

log = logging.getLogger(__name__)
TRUNCATIONS = ("error", "left", "right", "middle")


class DataError(UserError):
    pass


@dataclass
class PromptRecord:
    """One prompt, tokenized, with what the reward needs."""

    input_ids: list[int]
    data_source: str
    ground_truth: Any
    messages: list[dict]
    extra_info: dict = field(default_factory=dict)


def read_prompt_rows(files: Sequence[str | Path], prompt_key: str = "prompt", reward_fn_key: str = "data_source",
                     media_keys: Sequence[str] = ()) -> list[dict]:
    """Rows of verl's parquet layout. A column named by `media_keys` (data.image_key, video_key, audio_key) is
    refused: multimodal training is not built, and dropping the media would train on half of each prompt."""
    rows: list[dict] = []
    for path in map(Path, files):
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path}: not a readable parquet file ({err})") from None
        for column in (prompt_key, reward_fn_key, "reward_model"):
            if column not in table.column_names:
                raise DataError(f"{path}: missing column {column!r} (columns: {', '.join(table.column_names)})")
        if table.num_rows == 0:
            raise DataError(f"{path}: no rows")
        media = [key for key in media_keys if key and key in table.column_names]
        if media:
            raise DataError(f"{path}: has media column(s) {', '.join(map(repr, media))} (data.image_key / video_key / "
                            f"audio_key): multimodal data is not built yet; use text prompts")
        file_rows = table.to_pylist()
        for i, row in enumerate(file_rows):
            _check_row(row, path, i, prompt_key, reward_fn_key)
        rows.extend(file_rows)
    return rows


def is_messages(value) -> bool:
    """A non-empty list of {role, content} chat messages with string fields."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def _check_row(row: dict, path: Path, i: int, prompt_key: str, reward_fn_key: str) -> None:
    where = f"{path}: row {i}"
    if not is_messages(row[prompt_key]):
        raise DataError(f"{where}: column {prompt_key!r} must be a non-empty list of {{role, content}} messages")
    if not isinstance(row[reward_fn_key], str):
        raise DataError(f"{where}: column {reward_fn_key!r} must be a string, got {row[reward_fn_key]!r}")
    reward = row["reward_model"]
    if not isinstance(reward, dict) or "ground_truth" not in reward:
        raise DataError(f"{where}: column 'reward_model' must be a struct with a 'ground_truth' field")


def truncate(ids: list[int], max_length: int, mode: str) -> list[int]:
    """Cut ids to max_length: keep the end (left), the start (right), or both ends (middle)."""
    if len(ids) <= max_length:
        return ids
    if mode == "left":
        return ids[-max_length:]
    if mode == "right":
        return ids[:max_length]
    if mode == "middle":
        head = max_length // 2
        return ids[:head] + ids[len(ids) - (max_length - head):]
    raise ValueError(f"truncation mode {mode!r} cannot cut (expected one of {TRUNCATIONS[1:]})")


def tokenize_prompt(tokenizer, messages: list[dict], chat_template_kwargs: dict | None = None) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         **(chat_template_kwargs or {}))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load_prompts(
    files: Sequence[str | Path],
    tokenizer,
    max_prompt_length: int,
    prompt_key: str = "prompt",
    reward_fn_key: str = "data_source",
    filter_overlong_prompts: bool = False,
    truncation: str = "error",
    max_samples: int = -1,
    chat_template_kwargs: dict | None = None,
    media_keys: Sequence[str] = (),
) -> list[PromptRecord]:
    """Read, tokenize, filter and truncate; an empty result is an error naming the files."""
    rows = read_prompt_rows(files, prompt_key, reward_fn_key, media_keys)
    if max_samples is not None and max_samples > 0:
        rows = rows[:max_samples]
    records = []
    for i, row in enumerate(rows):
        ids = tokenize_prompt(tokenizer, row[prompt_key], chat_template_kwargs)
        if len(ids) > max_prompt_length:
            if filter_overlong_prompts:
                continue
            if truncation == "error":
                raise DataError(
                    f"{_row_origin(files, i)}: prompt has {len(ids)} tokens > data.max_prompt_length="
                    f"{max_prompt_length}; set data.filter_overlong_prompts=True or data.truncation=left|right|middle"
                )
            ids = truncate(ids, max_prompt_length, truncation)
        records.append(PromptRecord(ids, row[reward_fn_key], row["reward_model"]["ground_truth"],
                                    row[prompt_key], row.get("extra_info") or {}))
    if not records:
        raise DataError(f"{', '.join(map(str, files))}: no prompts left after filtering prompts longer than "
                        f"data.max_prompt_length={max_prompt_length}")
    _warn_unknown_tokens(records, tokenizer, files)
    return records


def _warn_unknown_tokens(records: list[PromptRecord], tokenizer, files: Sequence[str | Path]) -> None:
    """Characters the tokenizer cannot represent become its unknown token: the model sees a different prompt
    than the data holds. Not an error (a few odd characters are common), but worth a count."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    hit = [i for i, r in enumerate(records) if unk in r.input_ids]
    if hit:
        log.warning("%s: %d of %d prompts contain characters the tokenizer maps to its unknown token %r "
                    "(first: prompt %d)", ", ".join(map(str, files)), len(hit), len(records),
                    tokenizer.unk_token, hit[0])


def _row_origin(files: Sequence[str | Path], index: int) -> str:
    """`file: row k` for the index-th row over several files."""
    for path in files:
        n = pq.ParquetFile(path).metadata.num_rows
        if index < n:
            return f"{path}: row {index}"
        index -= n
    return f"row {index}"

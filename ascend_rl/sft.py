"""`ascend-rl sft`: supervised fine-tuning on chat prompts and responses, loss on the response only.

Used to warm up a model before RL (RL needs a model that is sometimes right, and a model that is always
right has nothing left to learn): with a holdout and `stop_at_exact_match`, training stops as soon as
greedy answers on the holdout reach that accuracy (measured every `eval_every` steps; the last measure is
logged). Input: parquet with a `prompt` column (chat messages, or a string taken as one user message) and a
`response` string column.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ascend_rl.data.collate import collate
from ascend_rl.data.dataset import DataError, is_messages, tokenize_prompt
from ascend_rl.data.model_dir import check_model_dir, load_tokenizer
from ascend_rl.files import new_dir
from ascend_rl.workers.model_io import response_log_probs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTSettings:
    model_path: str
    train_files: tuple[str, ...]
    out_dir: str
    epochs: float = 1.0
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    seed: int = 0
    threads: int | None = None
    holdout: int = 0  # pairs kept out of training to measure exact-match accuracy on
    stop_at_exact_match: float | None = None  # stop once greedy answers on the holdout reach this accuracy
    eval_every: int = 10  # steps between holdout checks (with stop_at_exact_match)

    def __post_init__(self):
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 1:
            raise ValueError(f"eval_every must be an integer >= 1, got {self.eval_every!r}")


def read_sft_pairs(files, tokenizer) -> list[tuple[list[int], list[int]]]:
    pairs = []
    for path in files:
        if not Path(path).is_file():
            raise DataError(f"{path}: no such file")
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path}: not a readable parquet file ({err})") from None
        for column in ("prompt", "response"):
            if column not in table.column_names:
                raise DataError(f"{path}: missing column {column!r} (columns: {', '.join(table.column_names)})")
        for i, row in enumerate(table.to_pylist()):
            prompt, response = row["prompt"], row["response"]
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            if not isinstance(response, str) or not is_messages(prompt):
                raise DataError(f"{path}: row {i}: 'prompt' must be messages or a string and 'response' a string")
            response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            pairs.append((tokenize_prompt(tokenizer, prompt), response_ids))
    if not pairs:
        raise DataError(f"{', '.join(map(str, files))}: no rows")
    return pairs


def exact_match(model, tokenizer, pairs, engine=None) -> float:
    """Fraction of prompts whose greedy answer reproduces the reference response exactly. `engine` may be
    a NativeEngine already serving `model` (it shares the model's weights)."""
    from ascend_rl.rollout.native import NativeEngine
    from ascend_rl.rollout.protocol import SamplingParams

    engine = engine or NativeEngine(model, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    longest = max(len(r) for _, r in pairs)
    outputs = engine.generate([p for p, _ in pairs], SamplingParams(max_new_tokens=longest, temperature=0))
    return sum(out.output_ids == ref for out, (_, ref) in zip(outputs, pairs)) / len(pairs)


def run_sft(settings: SFTSettings, progress: bool = True) -> Path:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    check_model_dir(settings.model_path, "--model")
    tokenizer = load_tokenizer(settings.model_path, "--model")
    model = AutoModelForCausalLM.from_pretrained(settings.model_path, dtype=torch.float32)
    pairs = read_sft_pairs(settings.train_files, tokenizer)
    rng = random.Random(settings.seed)
    rng.shuffle(pairs)
    holdout, pairs = pairs[:settings.holdout], pairs[settings.holdout:]
    if not pairs:
        raise DataError(f"sft: the holdout of {settings.holdout} leaves no training pairs")
    steps = max(1, math.ceil(len(pairs) * settings.epochs / settings.batch_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(steps * settings.warmup_ratio), steps)
    order: list[int] = []
    evaluator = None
    if holdout and settings.stop_at_exact_match is not None:
        from ascend_rl.rollout.native import NativeEngine

        evaluator = NativeEngine(model, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    bar = tqdm(range(steps), desc="sft", disable=not progress, unit="step")
    measured = None  # (step, accuracy) of the last holdout check
    for step in bar:
        model.train()
        if len(order) < settings.batch_size:
            fresh = list(range(len(pairs)))
            rng.shuffle(fresh)
            order += fresh
        chosen, order = order[:settings.batch_size], order[settings.batch_size:]
        batch = collate([pairs[i][0] for i in chosen], [pairs[i][1] for i in chosen], tokenizer.pad_token_id)
        log_probs, _ = response_log_probs(model, batch)
        mask = batch["response_mask"]
        loss = -(log_probs * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if evaluator is not None and (step + 1) % settings.eval_every == 0:
            accuracy = exact_match(model, tokenizer, holdout, evaluator)
            measured = step + 1, accuracy
            bar.set_postfix(loss=f"{loss.item():.3f}", holdout_exact=f"{accuracy:.3f}")
            if accuracy >= settings.stop_at_exact_match:
                break
    bar.close()
    if measured is not None:
        done, accuracy = measured
        stopped = "reached" if accuracy >= settings.stop_at_exact_match else "not reached"
        log.info("sft: holdout exact match %.3f at step %d of %d (target %g %s)", accuracy, done, steps,
                 settings.stop_at_exact_match, stopped)
    return _save(model, tokenizer, settings.model_path, Path(settings.out_dir))


def _save(model, tokenizer, source: str, out: Path) -> Path:
    """A new model directory, whole or not at all (an existing one is never replaced)."""
    from transformers import GenerationConfig

    with new_dir(out, "ascend-rl sft") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        GenerationConfig.from_pretrained(source).save_pretrained(tmp)
    return out

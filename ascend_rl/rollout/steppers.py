"""How the scheduler runs the model: rows join (prefill) and leave between decode steps.

`LeanStepper` (Qwen2/Qwen3/Llama through `LeanDecoder`) lets requests join a running batch and drops
finished rows; `TransformersStepper` runs any other architecture through its own forward and cache, one
batch at a time (no joining: transformers' cache cannot merge rows of different lengths).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from ascend_rl.data.collate import pad_rows, position_ids_from_mask
from ascend_rl.rollout.lean_decoder import LeanDecoder

# Called during a prefill with position_logits(prompt index, position) → [N, V] logits and the vocabulary size.
OnPrefill = Callable[[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], int], None]


class LeanStepper:
    can_join = True

    def __init__(self, decoder: LeanDecoder, pad_token_id: int):
        self.decoder, self.pad_token_id = decoder, pad_token_id

    @property
    def width(self) -> int:
        """Cache columns the running rows use (their longest prompt and output so far, at most)."""
        return self.decoder.length

    def admit(self, keep: torch.Tensor, prompts: list[list[int]], room: int,
              on_prefill: OnPrefill | None = None) -> torch.Tensor:
        """The running rows `keep` stay, `prompts` join; returns the joining rows' next-token logits. The n
        samples of a prompt share it: each distinct prompt is prefilled once and its KV rows copied.
        `on_prefill(position_logits, vocab)` runs while the prefill's hidden states are at hand (prompt scoring)."""
        device = self.decoder.model.device
        first: dict[tuple[int, ...], int] = {}  # each distinct prompt's row in the prefill
        inverse = torch.tensor([first.setdefault(tuple(p), len(first)) for p in prompts], dtype=torch.long)
        ids, mask = pad_rows(list(first), self.pad_token_id, "left")
        width = ids.shape[1]
        hidden, rows = self.decoder.prefill_hidden(ids.to(device), mask.to(device))
        logits = self.decoder.logits(hidden[:, -1])
        if on_prefill is not None:
            lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)

            def position_logits(prompt: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
                column = width - lengths[prompt] + position  # left padding
                return self.decoder.logits(hidden[inverse[prompt].to(device), column.to(device)])

            on_prefill(position_logits, logits.shape[-1])
        inverse = inverse.to(device)
        self.decoder.merge(keep.to(device), rows.take(inverse, 0, width), room)
        return logits[inverse]

    def keep_rows(self, keep: torch.Tensor, room: int) -> None:
        self.decoder.merge(keep.to(self.decoder.model.device), None, room)

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode(next_ids.to(self.decoder.model.device))

    def reset(self) -> None:
        self.decoder.merge(torch.arange(0), None, 0)


class TransformersStepper:
    can_join = False  # nor can rows leave: finished ones stay in the cache until the batch ends

    def __init__(self, model, pad_token_id: int):
        self.model, self.pad_token_id = model, pad_token_id
        # transformers 5 renamed the KV-cache argument and output field from past_key_values to cache.
        self.cache_key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.cache = None
        self.width = 0

    def admit(self, keep: torch.Tensor, prompts: list[list[int]], room: int,
              on_prefill: OnPrefill | None = None) -> torch.Tensor:
        if len(keep):
            raise RuntimeError("this architecture decodes one batch at a time: requests cannot join a running one")
        ids, self.mask = (t.to(self.model.device) for t in pad_rows(prompts, self.pad_token_id, "left"))
        self.positions = position_ids_from_mask(self.mask)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=self.positions, use_cache=True)
        self.cache, self.width = out[self.cache_key], ids.shape[1]
        if on_prefill is not None:  # transformers returns every position's logits
            lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)

            def position_logits(prompt: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
                column = self.width - lengths[prompt] + position  # left padding
                return out.logits[prompt.to(ids.device), column.to(ids.device)]

            on_prefill(position_logits, out.logits.shape[-1])
        return out.logits[:, -1]

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.positions = self.positions[:, -1:] + 1
        out = self.model(input_ids=next_ids[:, None].to(self.model.device), attention_mask=self.mask,
                         position_ids=self.positions, use_cache=True, **{self.cache_key: self.cache})
        self.cache, self.width = out[self.cache_key], self.width + 1
        return out.logits[:, -1]

    def reset(self) -> None:
        self.cache, self.width = None, 0


def stepper_for(model, pad_token_id: int):
    decoder = LeanDecoder.for_model(model)
    return LeanStepper(decoder, pad_token_id) if decoder is not None else TransformersStepper(model, pad_token_id)

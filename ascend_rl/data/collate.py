"""Prompt + response token lists → the padded tensors every stage reads.

Prompts are left-padded and responses right-padded, so every response starts at the same column and the
model sees `prompt ‖ response` contiguously; positions count real tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict import TensorDict


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so left padding does not shift them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def pad_rows(rows: Sequence[Sequence[int]], pad_token_id: int, side: str, min_width: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists → (ids, mask) [B, W], padded on the left (prompts) or the right (responses)."""
    width = max(min_width, max(map(len, rows)))
    left = side == "left"
    ids, mask = [], []
    for tokens in rows:  # padded as lists, one tensor each at the end (a tensor per row cost ~10 µs a row)
        pad = width - len(tokens)
        ids.append([pad_token_id] * pad + list(tokens) if left else list(tokens) + [pad_token_id] * pad)
        mask.append([0] * pad + [1] * len(tokens) if left else [1] * len(tokens) + [0] * pad)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def collate(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_token_id: int) -> TensorDict:
    batch = len(prompts)
    prompt_ids, prompt_mask = pad_rows(prompts, pad_token_id, "left")
    response_ids, response_mask = pad_rows(responses, pad_token_id, "right", min_width=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    return TensorDict({
        "prompts": prompt_ids,
        "responses": response_ids,
        "input_ids": torch.cat([prompt_ids, response_ids], dim=1),
        "attention_mask": attention_mask,
        "position_ids": position_ids_from_mask(attention_mask),
        "response_mask": response_mask.float(),
    }, batch_size=[batch])

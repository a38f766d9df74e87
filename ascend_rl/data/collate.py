"""Prompt + response token lists → the padded tensors every stage reads.

Prompts are left-padded and responses right-padded, so every response starts at the same column and the
model sees `prompt ‖ response` contiguously; positions count real tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict import TensorDict

from ascend_rl.workers.model_io import position_ids_from_mask


def collate(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_token_id: int) -> TensorDict:
    batch = len(prompts)
    width_p = max(map(len, prompts))
    width_r = max(1, max(map(len, responses)))
    prompt_ids = torch.full((batch, width_p), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((batch, width_p), dtype=torch.long)
    response_ids = torch.full((batch, width_r), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((batch, width_r), dtype=torch.long)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        if p:
            prompt_ids[row, width_p - len(p):] = torch.tensor(p)
            prompt_mask[row, width_p - len(p):] = 1
        if r:
            response_ids[row, :len(r)] = torch.tensor(r)
            response_mask[row, :len(r)] = 1
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    return TensorDict({
        "prompts": prompt_ids,
        "responses": response_ids,
        "input_ids": torch.cat([prompt_ids, response_ids], dim=1),
        "attention_mask": attention_mask,
        "position_ids": position_ids_from_mask(attention_mask),
        "response_mask": response_mask.float(),
    }, batch_size=[batch])

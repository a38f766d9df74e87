"""What the trainer needs of the tokenizer: the pad id to collate token lists, text for scorers and logs, and a
copy beside each checkpoint's weights (so `actor/` loads as a whole HF model)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Vocabulary:
    tokenizer: object  # a transformers tokenizer

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def decode(self, token_lists) -> list[str]:
        return self.tokenizer.batch_decode(token_lists, skip_special_tokens=True)

    def save(self, directory: Path) -> None:
        self.tokenizer.save_pretrained(directory)

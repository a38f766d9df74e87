"""Errors a user can fix. The CLI prints their messages (one line each) and exits non-zero; anything
else that escapes is a bug and keeps its traceback."""

from __future__ import annotations

from collections.abc import Sequence


class UserError(Exception):
    def __init__(self, messages: str | Sequence[str]):
        self.messages = [messages] if isinstance(messages, str) else list(messages)
        super().__init__("\n".join(self.messages))


def first_line(err: BaseException) -> str:
    """What a foreign exception says, on one line (its type name when it says nothing)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

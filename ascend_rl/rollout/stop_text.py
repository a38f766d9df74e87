"""Stop strings and stop regexes (SGLang's `stop`, `stop_regex`), matched against the decoded tail of a sample
after each token: only as many trailing tokens as a match ending in the newest token can span are decoded."""

from __future__ import annotations

import functools
import re
import re._parser as sre_parse  # what SGLang bounds a regex's match length with (Python ≥ 3.11)

_BYTES_PER_CHAR = 4  # UTF-8


@functools.lru_cache(maxsize=1024)
def tail_tokens(stop: tuple[str, ...], stop_regex: tuple[str, ...]) -> int | None:
    """Trailing tokens to decode: a token is at least one byte, so a match of b bytes lies within the last b + 1
    tokens. None: the whole output (a regex whose matches have no length bound, as in SGLang)."""
    widths = [len(text.encode()) for text in stop]
    for pattern in stop_regex:
        chars = max_chars(sre_parse.parse(pattern))
        if chars is None:
            return None
        widths.append(chars * _BYTES_PER_CHAR)
    return max(widths, default=0) + 1


def first_hit(text: str, stop: tuple[str, ...], stop_regex: tuple[str, ...]) -> str | None:
    """The first stop string in `text`, else the first pattern that matches in it (SGLang's order)."""
    hit = next((s for s in stop if s in text), None)
    if hit is not None:
        return hit
    return next((pattern for pattern in stop_regex if re.search(pattern, text)), None)


def max_chars(pattern) -> int | None:
    """The most characters a match of this parsed pattern spans; None: no bound (or one we cannot tell)."""
    total = 0
    for op, value in pattern:
        width = _WIDTHS.get(op, lambda v: None)(value)
        if width is None:
            return None
        total += width
    return total


def _repeat(value) -> int | None:
    _, most, inner = value
    width = max_chars(inner)
    return None if most == sre_parse.MAXREPEAT or width is None else most * width


def _branch(value) -> int | None:
    widths = [max_chars(branch) for branch in value[1]]
    return None if None in widths else max(widths, default=0)


# Opcode → its width. Lookarounds and back-references are unbounded here, as SGLang counts them.
_WIDTHS = {
    sre_parse.LITERAL: lambda v: 1,
    sre_parse.NOT_LITERAL: lambda v: 1,
    sre_parse.IN: lambda v: 1,
    sre_parse.ANY: lambda v: 1,
    sre_parse.AT: lambda v: 0,  # ^, $, \b: zero width
    sre_parse.SUBPATTERN: lambda v: max_chars(v[3]),
    sre_parse.ATOMIC_GROUP: max_chars,
    sre_parse.BRANCH: _branch,
    sre_parse.MAX_REPEAT: _repeat,
    sre_parse.MIN_REPEAT: _repeat,
    sre_parse.POSSESSIVE_REPEAT: _repeat,
}

"""The software stack's versions (`versions.toml`) and how Ascend versions compare."""

from __future__ import annotations

import re
import tomllib
from functools import cache
from pathlib import Path

VERSIONS_FILE = Path(__file__).with_name("versions.toml")


@cache
def versions() -> dict:
    with VERSIONS_FILE.open("rb") as f:
        return tomllib.load(f)


def ascend_version_key(text: str) -> tuple:
    """Orders CANN/HDK versions: 8.3.RC1 < 8.3.RC2 < 8.3.0 < 8.5.0; 25.3.rc1.2 and 25.5.t3.b001 read as
    25.3.rc1 and 25.5.t3 (test builds count as release candidates). Raises ValueError if unreadable."""
    match = re.match(r"^\s*(\d+)\.(\d+)(?:\.(rc|t)?(\d+))?", text.strip(), re.IGNORECASE)
    if not match:
        raise ValueError(f"not an Ascend version: {text!r}")
    major, minor, pre, patch = match.groups()
    stage = 0 if pre else 1  # a release candidate comes before the release of the same minor
    return int(major), int(minor), stage, int(patch or 0)


def ascend_at_least(found: str, minimum: str) -> bool:
    return ascend_version_key(found) >= ascend_version_key(minimum)


def installed_version(package: str) -> str | None:
    """The installed distribution's version, or None: what an optional dependency (sglang) is here."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None

"""Which `ServerArgs` fields an SGLang version has.

SGLang's `ServerArgs` is a dataclass up to 0.5.19 and a `msgspec.Struct` from 0.5.20 on
(`dataclasses.fields` raises on the latter), and fields come and go between releases, so a key is
checked against the installed version. Without SGLang installed (planning on a laptop for a cluster),
the committed field list of the version we pin stands in; `scripts/sglang_fields.py` regenerates those
lists from an installed SGLang.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

from packaging.version import Version

from ascend_rl import stack
from ascend_rl.stack import versions

SNAPSHOT_DIR = Path(__file__).with_name("fields")
PINNED_VERSION = versions()["minimum"]["sglang"]  # the seed's version

# Fields renamed or retired, and when: (version, replacement). A key the installed version still has
# is a warning from that version on; one it no longer has is an error that names the replacement.
DEPRECATED = {
    "enable_dp_attention": ("0.5.23", "attn_dp_size (--attn-dp-size)"),
    "cuda_graph_max_bs": ("0.5.19", "cuda_graph_max_bs_decode"),
    "cuda_graph_bs": ("0.5.19", "cuda_graph_bs_decode"),
}


@dataclass(frozen=True)
class ServerArgsFields:
    version: str
    names: frozenset[str]
    installed: bool  # False: the committed list of a version that is not installed here

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def describe(self) -> str:
        return f"SGLang {self.version}" + ("" if self.installed else " (its field list; SGLang is not installed here)")

    def closest(self, name: str, limit: int = 3) -> list[str]:
        return difflib.get_close_matches(name, sorted(self.names), n=limit, cutoff=0.6)

    def deprecation(self, name: str) -> str | None:
        """A note when `name` was deprecated or removed at or before this version."""
        since, replacement = DEPRECATED.get(name, (None, None))
        if since is None or Version(self.version) < Version(since):
            return None
        return f"deprecated since SGLang {since}; use {replacement}"


def field_names(server_args_cls) -> frozenset[str]:
    """Field names of a `ServerArgs` class, dataclass or msgspec.Struct."""
    if dataclasses.is_dataclass(server_args_cls):
        return frozenset(f.name for f in dataclasses.fields(server_args_cls))
    import msgspec

    return frozenset(f.name for f in msgspec.structs.fields(server_args_cls))


def installed_version() -> str | None:
    return stack.installed_version("sglang")


@lru_cache(maxsize=1)
def installed_fields() -> ServerArgsFields | None:
    version = installed_version()
    if version is None:
        return None
    from sglang.srt.server_args import ServerArgs

    return ServerArgsFields(version, field_names(ServerArgs), installed=True)


def snapshot_versions() -> list[str]:
    return sorted((p.stem for p in SNAPSHOT_DIR.glob("*.txt")), key=Version)


@cache
def snapshot_fields(version: str) -> ServerArgsFields:
    path = SNAPSHOT_DIR / f"{version}.txt"
    if not path.is_file():
        raise KeyError(f"no field list for SGLang {version}; have {', '.join(snapshot_versions())}")
    return ServerArgsFields(version, frozenset(path.read_text().split()), installed=False)


def current_fields() -> ServerArgsFields:
    """The installed SGLang's fields, else the pinned version's list."""
    return installed_fields() or snapshot_fields(PINNED_VERSION)

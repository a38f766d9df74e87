"""Writing outputs without ever replacing what is already there.

Everything ascend-rl writes for a user (datasets, models, exports) goes through these: the content is
written under a hidden temporary name beside the target and moved into place only when whole, and a target
that exists is an error, never overwritten. A crash leaves at most a hidden temporary, never half a file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ascend_rl.errors import UserError


def refuse_existing(path: str | os.PathLike, what: str) -> None:
    if os.path.lexists(path):
        raise UserError(f"{path} exists; {what} writes a new one and never overwrites it (choose another path "
                        f"or move it away)")


@contextmanager
def new_file(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """Yield a temporary path to write; on success it becomes `path`. A link, not a rename, puts it in
    place, because a link fails on an existing target where a rename would silently replace it."""
    target = Path(path)
    refuse_existing(target, what)
    _make_parent(target, what)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    os.close(fd)
    try:
        with _write_errors(target, what):
            yield Path(tmp)
        try:
            os.link(tmp, target)
        except FileExistsError:
            refuse_existing(target, what)
        except OSError as err:
            raise UserError(f"{target}: cannot write: {err.strerror}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def new_dir(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it is renamed to `path`, which must not exist."""
    target = Path(path)
    refuse_existing(target, what)
    _make_parent(target, what)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        with _write_errors(target, what):
            yield tmp
        refuse_existing(target, what)  # appeared while we wrote
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _write_errors(target: Path, what: str) -> Iterator[None]:
    """A full disk or a vanished directory while writing: one line naming the target, nothing left behind."""
    try:
        yield
    except OSError as err:
        raise UserError(f"{what} could not write {target}: {err.strerror or err}"
                        + (f" ({err.filename})" if err.filename else "")) from None


def _make_parent(target: Path, what: str) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{target.parent}: cannot create the directory for {what}: {err.strerror}") from None
    if not os.access(target.parent, os.W_OK):
        raise UserError(f"{target.parent}: not writable, so {what} cannot write {target.name} there")

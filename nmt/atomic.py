"""atomic.py — files written whole or not at all: via `.NAME.tmp` beside the file, fsynced, then renamed over it.

Checkpoints, vocabularies, distillation shards, corpora, manifests and recipe state all go through here, so a kill
leaves the old file or the new, never half of one, and a full disk keeps the old file and is one NMTError line.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from nmt.errors import NMTError


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that replaces `path` only once written in full and fsynced (via `.NAME.tmp` beside it): a
    kill leaves the old file or the new, never half; a failed write (a full disk) keeps the old file and is one
    NMTError line."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as err:
        temporary.unlink(missing_ok=True)
        failure = _write_failure(err)
        if failure is None:
            raise
        raise NMTError(f"could not write {path}: {failure.strerror or failure}; the previous file, if any, is "
                       f"kept") from None


def _write_failure(err: BaseException | None) -> OSError | None:
    """The OSError behind a failed write (torch.save raises a RuntimeError while handling it), or None."""
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    return err


def write_atomic(path: str | Path, data: bytes) -> None:
    """`data` as the file `path`, by `atomic_output`."""
    with atomic_output(path) as handle:
        handle.write(data)

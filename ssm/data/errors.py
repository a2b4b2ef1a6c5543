"""The error type of the data loaders: a file that does not hold what its format says.

Every loader in :mod:`ssm.data` reports malformed content as a :class:`DataError` whose message starts with
the file, then the line (text formats) or the record (binary formats) at fault, then what was expected::

    data/basic_train.tsv, line 7: Target '²'; expected an integer 0..9

A missing file or folder stays a ``FileNotFoundError`` (also naming it). ``DataError`` is a ``ValueError``,
so ``except ValueError`` keeps working, and it is built from its message alone, so that it survives the
re-raise of a ``DataLoader`` worker's exception with its type.
"""

from __future__ import annotations

import os

__all__ = ["DataError"]


class DataError(ValueError):
    """A data file that cannot be read as its format.

    Args:
        message: the full message (normally built by :meth:`at`).
        path, line, record: where, when known (kept as attributes; ``line`` and ``record`` count from 1
            and 0 respectively, as the messages do).

    Attributes:
        path: ``str`` or ``None``; line, record: ``int`` or ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike | None = None,
        line: int | None = None,
        record: int | None = None,
    ) -> None:
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)
        self.line = line
        self.record = record

    @classmethod
    def at(
        cls, path: str | os.PathLike, reason: str, *, line: int | None = None, record: int | None = None
    ) -> DataError:
        """``DataError("{path}, line {line}: {reason}")`` (or ``record {record}``, or the file alone)."""
        where = os.fspath(path)
        if line is not None:
            where += f", line {line}"
        elif record is not None:
            where += f", record {record}"
        return cls(f"{where}: {reason}", path=path, line=line, record=record)

"""Shared pieces of the token-level LRA tasks: a byte vocabulary, file-error helpers and padding collates.

Byte vocabulary (Text and Retrieval, as LRA's byte-level encoder): id 0 is padding, id 1 is the optional
end-of-sequence token, and byte ``b`` (0..255) is id ``b + 2``, so ``BYTE_VOCAB_SIZE = 258``. The text is
never decoded: the ids are the raw bytes of the file, which for UTF-8 text are its UTF-8 bytes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from .._checks import check_int

__all__ = [
    "BYTE_EOS",
    "BYTE_OFFSET",
    "BYTE_PAD",
    "BYTE_VOCAB_SIZE",
    "collate_pad",
    "collate_pair",
    "encode_bytes",
    "pad_sequences",
]

BYTE_PAD = 0
BYTE_EOS = 1
BYTE_OFFSET = 2
BYTE_VOCAB_SIZE = 256 + BYTE_OFFSET


def encode_bytes(data: bytes, *, max_length: int | None = None, append_eos: bool = False) -> np.ndarray:
    """Byte-level ids of ``data``: ``b + 2`` per byte, truncated, then optionally ``BYTE_EOS`` appended.

    Args:
        data: the raw bytes.
        max_length: keep at most this many ids in total (the end-of-sequence token included); ``None`` keeps
            everything.
        append_eos: append ``BYTE_EOS`` (id 1) after the (truncated) bytes.

    Returns:
        int64 array (L,) with L <= ``max_length``.
    """
    if max_length is not None:
        check_int("max_length", max_length, minimum=1 + int(append_eos))
        data = data[: max_length - int(append_eos)]
    ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64) + BYTE_OFFSET
    if append_eos:
        ids = np.append(ids, BYTE_EOS)
    return ids


def pad_sequences(seqs: Sequence[torch.Tensor], length: int | None = None, pad: int = 0) -> torch.Tensor:
    """Stack 1-D integer tensors into (B, L), right-padded with ``pad`` to ``length`` (default: longest)."""
    longest = max((int(s.shape[0]) for s in seqs), default=0)
    length = longest if length is None else max(length, longest)
    out = torch.full((len(seqs), length), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
    return out


def collate_pad(batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collate ``(ids (L_i,), label)`` items into a padded batch (padding id 0).

    Returns:
        ``x`` int64 (B, L) with L = max L_i, right-padded with 0; ``y`` int64 (B,); ``lengths`` int64 (B,),
        the true length of each row (``x[i, lengths[i]:]`` is padding).
    """
    xs = [item[0] for item in batch]
    y = torch.tensor([int(item[1]) for item in batch], dtype=torch.long)
    lengths = torch.tensor([int(x.shape[0]) for x in xs], dtype=torch.long)
    return pad_sequences(xs), y, lengths


def collate_pair(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collate ``(ids1 (L1_i,), ids2 (L2_i,), label)`` pairs (the Retrieval task).

    Both documents are padded with 0 to one common length L = max over the batch of L1_i and L2_i, so that
    they can be stacked and sent through one encoder, as the S4 setup does.

    Returns:
        ``x1`` int64 (B, L), ``x2`` int64 (B, L), ``y`` int64 (B,), ``lengths1`` (B,), ``lengths2`` (B,).
    """
    xs1 = [item[0] for item in batch]
    xs2 = [item[1] for item in batch]
    length = max((int(x.shape[0]) for x in xs1 + xs2), default=0)
    y = torch.tensor([int(item[2]) for item in batch], dtype=torch.long)
    len1 = torch.tensor([int(x.shape[0]) for x in xs1], dtype=torch.long)
    len2 = torch.tensor([int(x.shape[0]) for x in xs2], dtype=torch.long)
    return pad_sequences(xs1, length), pad_sequences(xs2, length), y, len1, len2


def require_file(path: str | os.PathLike, what: str) -> None:
    """Raise ``FileNotFoundError`` naming ``path`` and what it should hold, unless it is a file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(path)}: file not found; expected {what}")


def require_dir(path: str | os.PathLike, what: str) -> None:
    """Raise ``FileNotFoundError`` naming ``path`` and what it should hold, unless it is a directory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{os.fspath(path)}: directory not found; expected {what}")

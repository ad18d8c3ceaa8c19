"""A key column's merged run: every covered data file's key hashes in one sorted file.

The key index (key_index.py) keeps each data file's distinct key hashes in a file of its own, and
a lookup testing every stored hash against its keys cost about 7 ns a hash (1 s of a 1M-event
day's curation over a 50M-event history, for the LSH band keys alone). Lake maintenance merges a
column's files into one run each night (key_index.merge); a lookup then binary-searches only the
blocks of the run its keys fall in.

Layout: a magic; entries, files, blocks and a digest (blake2b) of the rest of the head; the
covered files' ids (32 bytes each); the first hash of every block of BLOCK entries; each block's
checksum (weighted by position: entries swapped or moved change it); the hashes; the owners
(uint32: a file's place among the ids). A lookup reads through the handle it read the head with
(a run replaced meanwhile is not mixed with it) and checks each block it reads (checksum, order,
fences, owners) once per process; a run failing a check is not used (the caller looks its files
up on their own). Written whole: staged, fsynced, renamed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

NAME = "merged.idx"  # a column folder's merged run
_MAGIC = b"FWKEYIX2"
BLOCK = 4_096  # entries a fence and a checksum cover (32 KB of hashes)
GAP_BLOCKS = 16  # needed blocks at most this far apart are read as one
READ_BLOCKS = 256  # ... and at most this many at a time (12 MB of hashes and owners)
MERGE_ENTRIES = 4_000_000  # a merge sorts a range of the hash space holding about this many at a time
_VERIFIED: dict[tuple, np.ndarray] = {}  # runs' blocks this process found intact, by file


class MergedRun:
    """The head of a merged run (ids, fences, block checksums) and the lookups it answers."""

    def __init__(self, ids: list[str], fences: np.ndarray, sums: np.ndarray, entries: int, start: int):
        self.ids, self.fences, self.sums, self.entries, self.start = ids, fences, sums, entries, start

    @classmethod
    def read(cls, run) -> MergedRun | None:
        """The head of the run open as `run`, or None when it fails its checks."""
        try:
            size = os.fstat(run.fileno()).st_size
            if run.read(len(_MAGIC)) != _MAGIC:
                return None
            counts = np.fromfile(run, np.uint64, 4)
            if len(counts) != 4:
                return None
            entries, files, blocks, digest = (int(value) for value in counts)
            start = len(_MAGIC) + 32 + 32 * files + 16 * blocks
            if blocks != -(-entries // BLOCK) or size != start + 12 * entries:  # before reading what they size
                return None
            head = run.read(32 * files)
            fences = np.fromfile(run, np.uint64, blocks)
            sums = np.fromfile(run, np.uint64, blocks)
        except (OSError, ValueError, OverflowError, MemoryError):
            return None
        if len(head) != 32 * files or len(fences) != blocks or len(sums) != blocks or \
                digest != _digest(counts[:3], head, fences, sums) or bool(np.any(fences[1:] < fences[:-1])):
            return None
        return cls([head[at:at + 32].decode("ascii", "replace") for at in range(0, len(head), 32)],
                   fences, sums, entries, start)

    def owners_of(self, file_ids: list[str | None]) -> dict[int, int]:
        """position in `file_ids` -> owner, of the files this run covers."""
        owner = {file_id: index for index, file_id in enumerate(self.ids)}
        return {position: owner[file_id] for position, file_id in enumerate(file_ids) if file_id in owner}

    def holding(self, run, query: np.ndarray) -> set[int] | None:
        """The owners of the files holding one of the sorted hashes `query`, read from `run` (the
        file this head was read from); None when a block read fails its checks."""
        if not self.entries:
            return set()
        # the blocks a key can be in: from the last starting below it (an equal hash may end the
        # block before the one it starts) to the last starting at or below it
        first = np.maximum(np.searchsorted(self.fences, query, "left") - 1, 0)
        last = np.maximum(np.searchsorted(self.fences, query, "right") - 1, 0)
        blocks = len(self.fences)
        opened = np.bincount(first, minlength=blocks + 1) - np.bincount(last + 1, minlength=blocks + 1)
        needed = np.flatnonzero(np.cumsum(opened[:-1]) > 0)
        if not len(needed):
            return set()
        # runs of needed blocks (those a few blocks apart read as one), READ_BLOCKS at most a read
        breaks = np.flatnonzero((np.diff(needed) > GAP_BLOCKS) | (np.diff(needed // READ_BLOCKS) > 0))
        owners: set[int] = set()
        try:
            # blocks this process checked in this same file (inode, size, modification time) are trusted
            status = os.fstat(run.fileno())
            seen = (status.st_ino, status.st_size, status.st_mtime_ns, BLOCK)
            if len(_VERIFIED) > 64:
                _VERIFIED.clear()
            verified = _VERIFIED.setdefault(seen, np.zeros(blocks, bool))
            for begin, end in zip(needed[np.r_[0, breaks + 1]].tolist(), needed[np.r_[breaks, len(needed) - 1]].tolist()):
                low, high = begin * BLOCK, min((end + 1) * BLOCK, self.entries)
                hashes, held = self._read(run, low, high)
                if hashes is None:
                    return None
                if not verified[begin:end + 1].all():
                    if not np.array_equal(_block_sums(hashes, held), self.sums[begin:end + 1]) or \
                            not np.array_equal(hashes[::BLOCK], self.fences[begin:end + 1]) or \
                            bool(np.any(hashes[1:] < hashes[:-1])) or bool(np.any(held >= len(self.ids))):
                        return None
                    verified[begin:end + 1] = True
                keys = query[np.searchsorted(query, hashes[0]):np.searchsorted(query, hashes[-1], "right")]
                left = np.searchsorted(hashes, keys)
                left = left[hashes[np.minimum(left, len(hashes) - 1)] == keys]  # the keys held (few)
                if len(left):
                    counts = np.searchsorted(hashes, hashes[left], "right") - left
                    at = np.repeat(left - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
                    owners.update(np.unique(held[at]).tolist())
        except (OSError, ValueError):
            return None
        return owners

    def _read(self, run, low: int, high: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        run.seek(self.start + 8 * low)
        hashes = np.fromfile(run, np.uint64, high - low)
        run.seek(self.start + 8 * self.entries + 4 * low)
        held = np.fromfile(run, np.uint32, high - low)
        return (hashes, held) if len(hashes) == len(held) == high - low else (None, None)


def write(path: Path, ids: list[str], found: list[np.ndarray]) -> int:
    """Write the run of the files `ids` (their sorted hashes `found`), a range of the hash space
    at a time; the entries written (0 when the disk refused it: lookups go on without it)."""
    entries = sum(len(part) for part in found)
    blocks = -(-entries // BLOCK)
    head = "".join(ids).encode("ascii")
    start = len(_MAGIC) + 32 + len(head) + 16 * blocks
    try:
        with staged(path, "w+b") as out:
            # the hashes and owners, range by range (each range's entries sorted: a merge of sorted files)
            ranges = max(1, -(-entries // MERGE_ENTRIES))
            bounds = [2**64 * share // ranges for share in range(ranges + 1)]
            at = 0
            for low, high in zip(bounds[:-1], bounds[1:]):
                parts = [part[np.searchsorted(part, np.uint64(low)):
                              len(part) if high >= 2**64 else np.searchsorted(part, np.uint64(high))]
                         for part in found]
                hashes = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
                owners = np.repeat(np.arange(len(parts), dtype=np.uint32), [len(part) for part in parts])
                order = np.argsort(hashes, kind="stable")
                out.seek(start + 8 * at)
                hashes[order].tofile(out)
                out.seek(start + 8 * entries + 4 * at)
                owners[order].tofile(out)
                at += len(hashes)
            # then each block's fence and checksum, read back a few blocks at a time
            fences, sums = np.zeros(blocks, np.uint64), np.zeros(blocks, np.uint64)
            step = BLOCK * READ_BLOCKS
            for low in range(0, entries, step):
                out.seek(start + 8 * low)
                hashes = np.fromfile(out, np.uint64, min(step, entries - low))
                out.seek(start + 8 * entries + 4 * low)
                owners = np.fromfile(out, np.uint32, len(hashes))
                fences[low // BLOCK:low // BLOCK + -(-len(hashes) // BLOCK)] = hashes[::BLOCK]
                sums[low // BLOCK:low // BLOCK + -(-len(hashes) // BLOCK)] = _block_sums(hashes, owners)
            counts = np.array([entries, len(ids), blocks], np.uint64)
            out.seek(0)
            out.write(_MAGIC)
            np.append(counts, np.uint64(_digest(counts, head, fences, sums))).tofile(out)
            out.write(head)
            fences.tofile(out)
            sums.tofile(out)
    except OSError:
        return 0
    return entries


@contextlib.contextmanager
def staged(path: Path, mode: str = "wb") -> Iterator:
    """A file written whole at `path`: under a staging name unique to this writer (any host),
    fsynced, then renamed into place; on an error the staging file is deleted and the error raised."""
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(staging, mode) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def _digest(*parts) -> int:
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        digest.update(part if isinstance(part, bytes) else np.ascontiguousarray(part).tobytes())
    return int.from_bytes(digest.digest(), "little")


@functools.lru_cache(maxsize=4)
def _weights(count: int) -> np.ndarray:
    """`count` fixed odd 64-bit weights, one per position in a block."""
    return np.random.default_rng(0x5EED).integers(0, 2**63, count, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def _block_sums(hashes: np.ndarray, owners: np.ndarray) -> np.ndarray:
    """Each BLOCK entries' checksum (the first at the start of `hashes`): their hashes and owners
    weighted by position, wrapping, plus their count (entries swapped, moved or zeroed change it)."""
    full = len(hashes) // BLOCK * BLOCK
    sums = [_weighted(hashes[:full].reshape(-1, BLOCK), owners[:full].reshape(-1, BLOCK), BLOCK)]
    if rest := len(hashes) - full:  # the last block, short: zeros weigh nothing
        sums.append(_weighted(np.pad(hashes[full:], (0, BLOCK - rest))[None],
                              np.pad(owners[full:], (0, BLOCK - rest))[None], rest))
    return np.concatenate(sums)


def _weighted(hashes: np.ndarray, owners: np.ndarray, count: int) -> np.ndarray:
    weights = _weights(BLOCK)
    with np.errstate(over="ignore"):
        return (np.einsum("ij,j->i", hashes, weights) * np.uint64(0x9E3779B97F4A7C15)
                + np.einsum("ij,j->i", owners.astype(np.uint64), weights[::-1]) * np.uint64(0xBF58476D1CE4E5B9)
                + np.uint64(count))

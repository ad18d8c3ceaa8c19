"""The landing zone: which files are there, and their lines.

Agents (or the logging client) drop `*.jsonl` / `*.jsonl.gz` files under
landing/{events,trajectories,annotations}/ (suffixes in any case). A file whose name
starts with '.' or ends in .tmp/.part is still being written and is skipped until
renamed. Only regular files are read: a symlink or a special file (FIFO, socket,
device) with a ready name is listed with its `problem` and recorded, never opened.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import stat as stat_module
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

KINDS = ("events", "trajectories", "annotations")
SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".inprogress")
# Our own copies in the making (`flywheel ingest`, `flywheel annotate`): a dot-name, so never
# read; a killed call's leftover is deleted by a later ingest (cleanup.clean_stale).
STAGING_PREFIX = ".flywheel-staging-"

LINE_SCHEMA = pa.schema([("source_line", pa.int64()), ("raw", pa.string()),
                         ("problem", pa.string()), ("raw_truncated", pa.bool_())])


@dataclass(frozen=True, order=True)
class LandingFile:
    mtime_ns: int
    relative: str  # path relative to the landing root, with '/' separators
    kind: str
    size_bytes: int
    path: Path
    problem: str | None = None  # why it is not read: a symlink, or not a regular file
    # when it last changed, name included: a rename or a copy that keeps the mtime (os.replace of an
    # older temp file, cp -p, rsync -t) still moves this, so landing_sensor's cursor sees it
    changed_ns: int = 0

    @property
    def seen_at(self) -> int:
        return max(self.mtime_ns, self.changed_ns)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.relative, self.size_bytes, self.mtime_ns)


def is_ready(name: str) -> bool:
    lower = name.lower()
    return not name.startswith(".") and not lower.endswith(TEMP_SUFFIXES) and lower.endswith(SUFFIXES)


def is_gzip(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def list_landing(landing_root: Path) -> list[LandingFile]:
    """Every ready file, oldest first (the order they are ingested in). Symlinks are never
    followed (a linked folder is not entered); one with a ready name, like a special file,
    is listed with its problem (lstat's size and mtime) so that it is recorded once."""
    found: list[LandingFile] = []
    for kind in KINDS:
        for path, info in walk(landing_root / kind):
            if not is_ready(path.name):
                continue
            problem = None
            if stat_module.S_ISLNK(info.st_mode):
                problem = f"a symbolic link (to {_link_target(path)}): only regular files are read"
            elif not stat_module.S_ISREG(info.st_mode):
                problem = f"not a regular file ({_file_type(info.st_mode)}): only regular files are read"
            found.append(LandingFile(info.st_mtime_ns, path.relative_to(landing_root).as_posix(),
                                     kind, info.st_size, path, problem, info.st_ctime_ns))
    return sorted(found)


def walk(folder: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """(path, lstat) of everything under folder that is not a directory; links are not followed."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # gone since listed
            continue
        if stat_module.S_ISDIR(info.st_mode):
            yield from walk(Path(entry.path))
        else:
            yield Path(entry.path), info


def _link_target(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _file_type(mode: int) -> str:
    for test, name in ((stat_module.S_ISFIFO, "a FIFO"), (stat_module.S_ISSOCK, "a socket"),
                       (stat_module.S_ISCHR, "a character device"), (stat_module.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "unknown type"


def open_landing_file(path: Path):
    """The file for binary reading (gunzipped if .gz), refusing a symlink or a special file
    that was swapped in since the listing (O_NOFOLLOW, then fstat on what was opened)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat_module.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return gzip.GzipFile(fileobj=handle, mode="rb") if is_gzip(path) else handle


def read_line_batches(path: Path, max_line_bytes: int, batch_lines: int) -> Iterator[pa.Table]:
    """The file's non-empty lines in batches, as (source_line, raw, problem, raw_truncated).

    `problem` is "not_utf8" or "oversized" for lines that must go to quarantine
    whatever they contain; raw then holds an escaped or cut copy.

    Lines are split natively (blocks of the file, split on b"\n" by Arrow), which is
    what iterating the binary file line by line did; the result is exactly that of
    `read_line_batches_python`, the reference: same 1-based numbers (blank lines
    count), trailing "\r" stripped, whitespace-only lines skipped, each batch exactly
    batch_lines rows but the last.
    """
    pending: list[pa.Table] = []
    pending_rows = 0
    for piece in _pieces(path, max_line_bytes):
        if piece.num_rows == 0:
            continue
        pending.append(piece)
        pending_rows += piece.num_rows
        while pending_rows >= batch_lines:
            table = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
            yield table.slice(0, batch_lines)
            rest = table.slice(batch_lines)
            pending, pending_rows = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
    if pending_rows:
        yield pa.concat_tables(pending) if len(pending) > 1 else pending[0]


def read_line_batches_python(path: Path, max_line_bytes: int, batch_lines: int) -> Iterator[pa.Table]:
    """Reference implementation of read_line_batches: one Python step per line (~1 µs/line)."""
    with open_landing_file(path) as handle:
        numbers: list[int] = []
        raws: list[str] = []
        problems: list[str | None] = []
        truncated: list[bool] = []
        for number, line in enumerate(handle, start=1):
            if number == 1:
                line = line.removeprefix(BOM)
            if _add_line(line, number, max_line_bytes, numbers, raws, problems, truncated) and len(numbers) >= batch_lines:
                yield _batch(numbers, raws, problems, truncated)
                numbers, raws, problems, truncated = [], [], [], []
        if numbers:
            yield _batch(numbers, raws, problems, truncated)


def _add_line(line: bytes, number: int, max_line_bytes: int, numbers, raws, problems, truncated) -> bool:
    """One line, as the reference reads it; False for a blank line (skipped)."""
    line = line.rstrip(b"\r\n")
    if not line.strip():
        return False
    problem = None
    cut = False
    if len(line) > max_line_bytes:
        problem, cut = "oversized", True
        line = line[:max_line_bytes]
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        text = line.decode("utf-8", errors="backslashreplace")
        problem = problem or "not_utf8"
    numbers.append(number)
    raws.append(text)
    problems.append(problem)
    truncated.append(cut)
    return True


def _batch(numbers, raws, problems, truncated) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array(numbers, pa.int64()), pa.array(raws, pa.string()),
         pa.array(problems, pa.string()), pa.array(truncated, pa.bool_())],
        schema=LINE_SCHEMA,
    )


_BLOCK_BYTES = 16 << 20
BOM = b"\xef\xbb\xbf"
# bytes.strip() strips ASCII whitespace: space, \t, \n, \r, \x0b, \x0c
_SPACE = np.zeros(256, dtype=bool)
_SPACE[[9, 10, 11, 12, 13, 32]] = True


def _pieces(path: Path, max_line_bytes: int) -> Iterator[pa.Table]:
    """The file read in blocks; each block's complete lines as one table (LINE_SCHEMA)."""
    buffer = bytearray(_BLOCK_BYTES)
    held = 0  # bytes at the front of buffer: the start of a line that the last block did not end
    consumed = 0  # lines before them
    first = True
    with open_landing_file(path) as handle:
        while True:
            if held == len(buffer):  # one line longer than the buffer: make room
                buffer.extend(bytes(len(buffer)))
            with memoryview(buffer) as view:
                read = handle.readinto(view[held:])
            if not read:
                break
            total = held + read
            if first and total >= len(BOM):
                first = False
                if buffer.startswith(BOM):  # a UTF-8 byte order mark is not part of the first line
                    buffer[:total - len(BOM)] = buffer[len(BOM):total]
                    total -= len(BOM)
            cut = buffer.rfind(b"\n", held, total) + 1
            if cut == 0:
                held = total
                continue
            piece, count = _split(buffer, cut - 1, consumed + 1, max_line_bytes)
            consumed += count
            yield piece
            buffer[:total - cut] = buffer[cut:total]
            held = total - cut
    if held:  # a last line without a newline
        yield _split(buffer, held, consumed + 1, max_line_bytes)[0]


def _split(data: bytearray, end: int, first_number: int, max_line_bytes: int) -> tuple[pa.Table, int]:
    """data[:end] split on b"\n" (count lines, numbered from first_number), copied out of data."""
    large = end >= 2**31 - 1
    offsets = pa.py_buffer(np.array([0, end], dtype=np.int64 if large else np.int32))
    kind = pa.large_binary() if large else pa.binary()
    whole = pa.Array.from_buffers(kind, 1, [None, offsets, pa.py_buffer(data)])
    lines = pc.split_pattern(whole, b"\n").flatten()
    if large:
        lines = lines.cast(pa.binary())  # only one line can be that long: oversized, and cut
    count = len(lines)
    bounds = np.frombuffer(lines.buffers()[1], dtype=np.int32, count=count + 1, offset=lines.offset * 4)
    data_buffer = lines.buffers()[2]
    content = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    starts, ends = bounds[:-1].astype(np.int64), bounds[1:].astype(np.int64)
    # Lines the reference decodes itself: oversized ones, and those that are not UTF-8.
    special = (ends - starts) > max_line_bytes
    try:
        text = lines.cast(pa.string())  # checks UTF-8
    except pa.ArrowInvalid:  # which ones: only a line with a byte >= 0x80 can be
        text = None
        high = np.unique(np.searchsorted(starts, np.flatnonzero(content >= 0x80), side="right") - 1)
        for i in high:
            try:
                bytes(content[starts[i]:ends[i]]).decode("utf-8")
            except UnicodeDecodeError:
                special[i] = True
    if special.any():
        rest, odd = np.flatnonzero(~special), np.flatnonzero(special)
        numbers: list[int] = []
        raws: list[str] = []
        problems: list[str | None] = []
        truncated: list[bool] = []
        for i in odd:
            _add_line(bytes(content[starts[i]:ends[i]]), first_number + int(i), max_line_bytes,
                      numbers, raws, problems, truncated)
        table = pa.concat_tables([_plain(lines.take(pa.array(rest)).cast(pa.string()), rest + first_number),
                                  _batch(numbers, raws, problems, truncated)])
        return table.sort_by("source_line"), count
    return _plain(text, np.arange(first_number, first_number + count)), count


def _first_bytes(text: pa.Array) -> np.ndarray:
    """Each string's first byte (0 for an empty one)."""
    offsets = np.frombuffer(text.buffers()[1], dtype=np.int32, count=len(text) + 1, offset=text.offset * 4)
    data = text.buffers()[2]
    content = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    if len(content) == 0:
        return np.zeros(len(text), dtype=np.uint8)
    first = content[np.minimum(offsets[:-1], len(content) - 1)]
    return np.where(offsets[1:] > offsets[:-1], first, 0)


def _plain(text: pa.Array, numbers: np.ndarray) -> pa.Table:
    """Lines (none oversized or not UTF-8) as the reference keeps them."""
    lengths = pc.binary_length(text).to_numpy(zero_copy_only=False)
    if len(text) and pc.any(pc.ends_with(text, "\r")).as_py():  # rstrip(b"\r\n") keeps the rest as it is
        text = pc.utf8_rtrim(text, characters="\r")
        lengths = pc.binary_length(text).to_numpy(zero_copy_only=False)
    keep = lengths > 0
    # a line that starts with whitespace may be blank: bytes.strip() strips these six
    spaced = np.flatnonzero(keep & _SPACE[_first_bytes(text)])
    if len(spaced):
        stripped = pc.utf8_trim(text.take(pa.array(spaced)), characters=" \t\n\r\x0b\x0c")
        keep[spaced] = pc.binary_length(stripped).to_numpy(zero_copy_only=False) > 0
    rows = np.flatnonzero(keep)
    if len(rows) != len(text):
        text, numbers = text.take(pa.array(rows)), numbers[rows]
    n = len(text)
    return pa.Table.from_arrays(
        [pa.array(numbers, pa.int64()), text, pa.nulls(n, pa.string()), pa.array(np.zeros(n, dtype=bool))],
        schema=LINE_SCHEMA,
    )


def content_addressed_name(source: Path) -> str:
    """<sha256 prefix>-<name>, ending in a suffix the landing zone reads: the same content lands under one name."""
    digest = hashlib.sha256()
    with source.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    name = source.name.lstrip(".")
    if not name.lower().endswith(SUFFIXES):
        name = name[:-3] + ".jsonl.gz" if name.lower().endswith(".gz") else name + ".jsonl"
    return f"{digest.hexdigest()[:16]}-{name}"


def kind_from_folder(source: Path, root: Path) -> str | None:
    """The nearest enclosing folder named events, trajectories or annotations, up to root's parent."""
    for folder in source.parents:
        if folder.name in KINDS:
            return folder.name
        if folder == root.parent or folder == root:
            break
    return None


def sniff_kind(source: Path, max_lines: int = 50) -> str | None:
    """The kind the first JSON objects look like: an event_type, a conversation, or a score for a
    trajectory; None when they do not tell (or the file cannot be read: see read_error)."""
    try:
        with io.TextIOWrapper(open_landing_file(source), encoding="utf-8", errors="replace") as handle:
            lines = [line.lstrip("\ufeff") for _, line in zip(range(max_lines), handle)]
    except READ_ERRORS:
        return None
    for line in lines:
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(obj, dict):
            continue
        if "event_type" in obj:
            return "events"
        if "conversations" in obj or "messages" in obj:
            return "trajectories"
        if "trajectory_id" in obj and ("score" in obj or "label" in obj):
            return "annotations"
    return None


# What reading a landing file can raise: unreadable, or a .gz that is truncated, not gzip, or
# corrupt. Only is_poison ones are the file's fault; the rest (EIO, ESTALE, EMFILE, ENOMEM...) are
# the machine's, and fail the run so that the file is read again later.
READ_ERRORS = (OSError, EOFError, zlib.error)
_FILE_ERRNOS = {errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.ENOENT, errno.ENOTDIR}


def is_poison(error: BaseException) -> bool:
    """True when the error says the file itself cannot be read (recorded once, as a quarantine row);
    False for a fault of the machine that a later run may not meet."""
    if isinstance(error, (EOFError, zlib.error, gzip.BadGzipFile)):
        return True
    return isinstance(error, OSError) and error.errno in _FILE_ERRNOS or \
        isinstance(error, OSError) and error.errno is None  # our own "not a regular file" refusal


def describe_read_error(error: BaseException) -> str:
    if isinstance(error, EOFError):
        return "the gzip stream ends early (truncated file)"
    if isinstance(error, gzip.BadGzipFile):
        return f"not a gzip file: {error}"
    if isinstance(error, zlib.error):
        return f"corrupt gzip data: {error}"
    return f"{type(error).__name__}: {error.strerror or error}" if isinstance(error, OSError) else str(error)

"""A landing zone on object storage (FLYWHEEL_LANDING_URI): where agents, or Kafka Connect's S3
sink, write their files without a volume shared with Flywheel.

The bucket holds `{events,trajectories,annotations}/…` as the local landing zone does, with the
same names (`is_ready`: no dot names, no .tmp/.part), or the S3 sink's `.json`/`.json.gz`.
Every ingest first copies, under the landing zone's lock, each ready object the ledger has not
recorded into the local landing zone (`<kind>/from-bucket/<rest of the key>`; a sink object
under `<kind>/from-bucket-json/`, renamed `.jsonl`/`.jsonl.gz`), with the object's LastModified
as its mtime — so the ledger's key (path, size, mtime) is the object's, whichever machine
ingests it, and the ingest then goes on as for
any local file (every guarantee of docs/ingestion.md holds from there). Objects are never
deleted: a machine that dies between the copy and the commit loses nothing, the next ingest
anywhere copies the object again (a bucket lifecycle rule expires them once ingested; the
local copies stay the landing zone's record). A copy is written under a staging name
(`.flywheel-staging-*`, never read, deleted when stale) and renamed into place, so no ingest
reads half an object.

The right to be forgotten and retention reach the bucket too (`scrub_bucket`): every object is
read from the bucket and scrubbed, and each rewritten one is uploaded over its object and becomes
its local copy; the ledger then follows its new size and LastModified, so it is not ingested again.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.ingest.landing import KINDS, STAGING_PREFIX, LandingFile, is_ready
from flywheel_assets.lib.lake import Lake, sql_literal
from flywheel_assets.lib.storage.artifacts import filesystem
from flywheel_assets.lib.tables import INGESTED_FILES

URI_VARIABLE = "FLYWHEEL_LANDING_URI"
OPTIONS_VARIABLE = "FLYWHEEL_LANDING_STORAGE_OPTIONS"


# Copies go under landing/<kind>/from-bucket/ (the key below its kind folder kept), so no object can
# overwrite an agent's local file; Kafka Connect's S3 sink's JSON-lines objects (.json, .json.gz)
# under landing/<kind>/from-bucket-json/, renamed to a suffix the landing zone reads. Two keys never
# share a local path.
BUCKET_FOLDER, SINK_FOLDER = "from-bucket", "from-bucket-json"
_SINK_SUFFIXES = ((".json.gz", ".jsonl.gz"), (".json", ".jsonl"))


def local_relative(key: str) -> str | None:
    """Where an object's copy goes, relative to the landing zone; None when the object is not
    ready to ingest or its key is not a plain relative path (`..`, empty parts)."""
    kind, _, rest = key.partition("/")
    parts = rest.split("/")
    if kind not in KINDS or not rest or any(part in ("", ".", "..") for part in parts):
        return None
    folder, name = "/".join(parts[:-1]), parts[-1]
    folder = f"/{folder}" if folder else ""
    if is_ready(name):
        return f"{kind}/{BUCKET_FOLDER}{folder}/{name}"
    for suffix, local_suffix in _SINK_SUFFIXES:
        if name.lower().endswith(suffix) and is_ready(renamed := name[:len(name) - len(suffix)] + local_suffix):
            return f"{kind}/{SINK_FOLDER}{folder}/{renamed}"
    return None


@dataclass(frozen=True)
class RemoteObject:
    key: str  # its path below the bucket's root
    file: LandingFile  # its local copy's, under the landing zone


@dataclass(frozen=True)
class RemoteLanding:
    fs: pafs.FileSystem
    root: str
    uri: str

    def ready(self, landing: Path) -> list[RemoteObject]:
        """Every ready object, with the LandingFile its local copy under `landing` will be."""
        found = []
        for kind in KINDS:
            selector = pafs.FileSelector(f"{self.root}/{kind}", recursive=True, allow_not_found=True)
            for info in self.fs.get_file_info(selector):
                key = info.path[len(self.root) + 1:]
                if info.type != pafs.FileType.File or (relative := local_relative(key)) is None:
                    continue
                found.append(RemoteObject(key, LandingFile(info.mtime_ns, relative, kind, info.size, landing / relative)))
        return sorted(found, key=lambda found: found.file)

    def copy_in(self, objects: list[RemoteObject], log=print) -> int:
        """Make each object's local copy the object (skipped when its size and mtime already are).
        An object that cannot be read now (a denied or archived object, a network error) is
        named in the log and left for the next ingest; the others go on."""
        copied = 0
        for remote in objects:
            file = remote.file
            if file.path.is_file() and not file.path.is_symlink() and \
                    _size_and_mtime(file.path) == (file.size_bytes, file.mtime_ns):
                continue
            try:
                self.download(remote.key, file.path, file.mtime_ns)
            except OSError as error:
                log(f"could not copy {self.uri}/{remote.key} now, left for the next ingest: {error}")
                continue
            copied += 1
        return copied

    def download(self, key: str, path: Path, mtime_ns: int) -> None:
        """The object at `key` to `path`, with `mtime_ns` as its mtime: written under a staging name
        (never read; deleted by a later ingest when stale), fsynced, renamed into place."""
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f"{STAGING_PREFIX}{uuid.uuid4().hex}")
        try:
            pafs.copy_files(f"{self.root}/{key}", str(staging), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            with open(staging, "rb") as handle:
                os.fsync(handle.fileno())
            os.utime(staging, ns=(mtime_ns, mtime_ns))
            staging.replace(path)
        finally:
            staging.unlink(missing_ok=True)

    def upload(self, path: Path, key: str) -> None:
        pafs.copy_files(str(path), f"{self.root}/{key}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    def listed(self, key: str) -> tuple[int, int]:
        """An object's (size, mtime_ns) as a listing gives them (`ready` lists; a HEAD request can
        round LastModified otherwise on some stores)."""
        folder = f"{self.root}/{key}".rsplit("/", 1)[0]
        info = next(info for info in self.fs.get_file_info(pafs.FileSelector(folder))
                    if info.path == f"{self.root}/{key}")
        return info.size, info.mtime_ns


def _size_and_mtime(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns


def remote_landing(environ=None) -> RemoteLanding | None:
    """The landing bucket FLYWHEEL_LANDING_URI names (credentials: FLYWHEEL_LANDING_STORAGE_OPTIONS,
    else the lake's FLYWHEEL_STORAGE_OPTIONS), or None."""
    environ = os.environ if environ is None else environ
    uri = environ.get(URI_VARIABLE)
    if not uri:
        return None
    options = environ.get(OPTIONS_VARIABLE) or environ.get("FLYWHEEL_STORAGE_OPTIONS")
    fs, root = filesystem(uri, json.loads(options) if options else None)
    return RemoteLanding(fs, root, uri)


def pull(config: FlywheelConfig, lake: Lake, log=print) -> int:
    """Copy the bucket's objects the ledger has not recorded into the landing zone; the caller holds
    the landing zone's lock. Returns how many were copied."""
    from flywheel_assets.lib.ingest.pipeline import pending_files

    remote = remote_landing()
    if remote is None:
        return 0
    objects = remote.ready(config.landing)
    pending = {file.key for file in pending_files(config, lake, [found.file for found in objects])}
    copied = remote.copy_in([found for found in objects if found.file.key in pending], log)
    if copied:
        log(f"copied {copied} new object(s) from {remote.uri} into {config.landing}")
    return copied


def scrub_bucket(config: FlywheelConfig, lake: Lake, scrub: Callable[[Path], list[int]]) -> dict[str, list[int]]:
    """Forget's and retention's pass over the bucket (the caller holds every lock): each object is
    read from the bucket itself (never trusted from a local copy: a run killed between scrubbing
    a copy and uploading it must find the object unscrubbed again), `scrub` rewrites the
    downloaded file in place and returns the line numbers it blanked; a changed one is uploaded over
    its object, becomes its local copy, and its ledger rows follow the object's new size and
    LastModified (as the bucket lists it), so it is not ingested again — object by object, right
    after its upload: a run that fails at the next object leaves nothing to re-ingest.
    Returns {relative path of the local copy: the line numbers blanked} of the objects rewritten."""
    remote = remote_landing()
    if remote is None:
        return {}
    for leftover in (config.home / "privacy").glob(".bucket-*"):  # a killed run's downloads
        shutil.rmtree(leftover, ignore_errors=True)
    scratch = config.home / "privacy" / f".bucket-{uuid.uuid4().hex}"
    blanked: dict[str, list[int]] = {}
    try:
        for found in remote.ready(config.landing):
            before = found.file
            copy = scratch / before.relative
            remote.download(found.key, copy, before.mtime_ns)
            if not (numbers := scrub(copy)):
                continue
            remote.upload(copy, found.key)
            size, mtime_ns = remote.listed(found.key)
            os.utime(copy, ns=(mtime_ns, mtime_ns))
            before.path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(copy, before.path)
            follow_ledger(lake, before.relative, before.size_bytes, size, before.mtime_ns, mtime_ns)
            blanked[before.relative] = numbers
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return blanked


def follow_ledger(lake: Lake, source_file: str, size_before: int, size_after: int,
                  mtime_before: int | None = None, mtime_after: int | None = None) -> None:
    """The ledger rows of a landing file rewritten in place (forget, retention) take its new size,
    and its new mtime when it has one, so the next ingest does not take it for a new file. Rows
    are matched on the size (and mtime, when given) it had before; none matching: nothing to do."""
    where = f"source_file = {sql_literal(source_file)}"
    rows = lake.read(INGESTED_FILES, filter_sql=where).to_pylist()  # every row of the path (the predicate's)

    def was(row: dict) -> bool:
        return row["size_bytes"] == size_before and mtime_before in (None, row["mtime_ns"])

    if any(was(row) for row in rows):
        for row in rows:
            if was(row):
                row["size_bytes"] = size_after
                row["mtime_ns"] = row["mtime_ns"] if mtime_after is None else mtime_after
        lake.overwrite(INGESTED_FILES, pa.Table.from_pylist(rows, schema=INGESTED_FILES.schema), predicate=where)

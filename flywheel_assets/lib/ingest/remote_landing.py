"""A landing zone on object storage (FLYWHEEL_LANDING_URI): where agents, or Kafka Connect's S3
sink, write their files without a volume shared with Flywheel.

The bucket holds `{events,trajectories,annotations}/…` as the local landing zone does, with the
same names (`is_ready`: no dot names, no .tmp/.part), or the S3 sink's `.json`/`.json.gz`
(copied in as `.json.jsonl`/`.json.jsonl.gz`). Every ingest first copies, under the
landing zone's lock, each ready object the ledger has not recorded into the local landing zone
at the same path, with the object's LastModified as its mtime — so the ledger's key (path,
size, mtime) is the object's, whichever machine ingests it, and the ingest then goes on as for
any local file (every guarantee of docs/ingestion.md holds from there). Objects are never
deleted: a machine that dies between the copy and the commit loses nothing, the next ingest
anywhere copies the object again (a bucket lifecycle rule expires them once ingested; the
local copies stay the landing zone's record). A copy is written under a staging name
(`.flywheel-staging-*`, never read, deleted when stale) and renamed into place, so no ingest
reads half an object.

The right to be forgotten and retention reach the bucket too (`mirror`, then `replace`): every
object is copied, the local copies are scrubbed, and each rewritten one is uploaded over its
object; the ledger then follows its new size and LastModified, so it is not ingested again.
"""

from __future__ import annotations

import json
import os
import uuid
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


# Kafka Connect's S3 sink names its JSON-lines objects .json / .json.gz: copied in under a name the
# landing zone reads
_SINK_SUFFIXES = ((".json.gz", ".json.jsonl.gz"), (".json", ".json.jsonl"))


def local_name(name: str) -> str | None:
    """The name an object's local copy takes, or None when the object is not ready to ingest."""
    if is_ready(name):
        return name
    lower = name.lower()
    for suffix, local_suffix in _SINK_SUFFIXES:
        if lower.endswith(suffix) and is_ready(name[:len(name) - len(suffix)] + local_suffix):
            return name[:len(name) - len(suffix)] + local_suffix
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
                folder, _, name = key.rpartition("/")
                if info.type != pafs.FileType.File or (name := local_name(name)) is None:
                    continue
                relative = f"{folder}/{name}"
                found.append(RemoteObject(key, LandingFile(info.mtime_ns, relative, kind, info.size, landing / relative)))
        return sorted(found, key=lambda found: found.file)

    def copy_in(self, objects: list[RemoteObject]) -> int:
        """Make each object's local copy the object (skipped when its size and mtime already are)."""
        copied = 0
        for remote in objects:
            file = remote.file
            if file.path.is_file() and not file.path.is_symlink() and (file.path.stat().st_size, file.path.stat().st_mtime_ns) \
                    == (file.size_bytes, file.mtime_ns):
                continue
            file.path.parent.mkdir(parents=True, exist_ok=True)
            staging = file.path.with_name(f"{STAGING_PREFIX}{uuid.uuid4().hex}")
            try:
                pafs.copy_files(f"{self.root}/{remote.key}", str(staging), source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())
                with open(staging, "rb") as handle:
                    os.fsync(handle.fileno())
                os.utime(staging, ns=(file.mtime_ns, file.mtime_ns))
                staging.replace(file.path)
            finally:
                staging.unlink(missing_ok=True)
            copied += 1
        return copied

    def replace(self, remote: RemoteObject) -> tuple[int, int]:
        """Upload the local copy over its object; its local mtime becomes the new object's
        LastModified. Returns the object's (size, mtime_ns)."""
        path = remote.file.path
        pafs.copy_files(str(path), f"{self.root}/{remote.key}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)
        info = self.fs.get_file_info(f"{self.root}/{remote.key}")
        os.utime(path, ns=(info.mtime_ns, info.mtime_ns))
        return info.size, info.mtime_ns


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
    copied = remote.copy_in([found for found in objects if found.file.key in pending])
    if copied:
        log(f"copied {copied} new object(s) from {remote.uri} into {config.landing}")
    return copied


def mirror(config: FlywheelConfig) -> RemoteLanding | None:
    """Every object copied into the landing zone, ingested or not (forget and retention scrub the
    copies, then `replace_scrubbed`); the caller holds the landing zone's lock."""
    remote = remote_landing()
    if remote is not None:
        remote.copy_in(remote.ready(config.landing))
    return remote


def replace_scrubbed(config: FlywheelConfig, lake: Lake, remote: RemoteLanding, paths: list[Path]) -> set[str]:
    """Upload the scrubbed local copies over their objects and move their ledger rows to the new
    (size, mtime), so the rewritten objects are not taken for new ones. Returns their relative paths."""
    objects = {found.file.relative: found for found in remote.ready(config.landing)}
    done = set()
    for path in paths:
        relative = path.relative_to(config.landing).as_posix()
        if (found := objects.get(relative)) is None:
            continue  # a local file only (dropped by `flywheel ingest`, or the object expired)
        before = found.file
        size, mtime_ns = remote.replace(found)
        where = f"source_file = {sql_literal(relative)}"
        rows = lake.read(INGESTED_FILES, filter_sql=where).to_pylist()
        if any((row["size_bytes"], row["mtime_ns"]) == (before.size_bytes, before.mtime_ns) for row in rows):
            for row in rows:
                if (row["size_bytes"], row["mtime_ns"]) == (before.size_bytes, before.mtime_ns):
                    row["size_bytes"], row["mtime_ns"] = size, mtime_ns
            lake.overwrite(INGESTED_FILES, pa.Table.from_pylist(rows, schema=INGESTED_FILES.schema), predicate=where)
        done.add(relative)
    return done

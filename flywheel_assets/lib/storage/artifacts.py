"""Models, datasets and reports on object storage: the artifact store.

With FLYWHEEL_ARTIFACTS_URI set (`s3://bucket/prefix`, or a folder every machine mounts), each
artifact the loop writes under FLYWHEEL_HOME (a base model's or an adapter's folder, a cycle's
exported dataset, a report) is uploaded to the same path below that root once it is whole,
and a machine that reads one it does not hold (a GPU node training over the champion, a
gateway pod serving it, an evaluation) downloads it first. FLYWHEEL_HOME is then each
machine's cache; the store is the truth.

A folder is published file by file, then its marker (`.flywheel-complete.json`: every file's
size and a generation id) last: a reader that finds the marker finds every file it lists, and a
folder without one is not (yet) in the store. A local copy whose marker names the store's
generation is current; any other is downloaded again (a forget rewrote it), each file to a
temporary name first and renamed into place, so a killed download leaves no half file under
a real name. A single file is current when its size and mtime are the store's.

Credentials: FLYWHEEL_ARTIFACTS_STORAGE_OPTIONS, else the lake's FLYWHEEL_STORAGE_OPTIONS
(delta-rs's keys: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION,
AWS_ENDPOINT_URL, AWS_ALLOW_HTTP), else the environment's AWS credential chain.
"""

from __future__ import annotations

import json
import os
import uuid
from functools import lru_cache
from pathlib import Path

import pyarrow.fs as pafs

URI_VARIABLE = "FLYWHEEL_ARTIFACTS_URI"
OPTIONS_VARIABLE = "FLYWHEEL_ARTIFACTS_STORAGE_OPTIONS"
MARKER = ".flywheel-complete.json"
_TEMP_PREFIX = ".flywheel-pull-"


class ArtifactMissing(FileNotFoundError):
    pass


def filesystem(uri: str, options: dict[str, str] | None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the root path in it for `uri`, credentials from delta-rs-style options."""
    if not uri.startswith(("s3://", "s3a://")):
        local, path = pafs.FileSystem.from_uri(uri if "://" in uri else Path(uri).resolve().as_uri())
        return local, path.rstrip("/")
    options = {key.upper(): value for key, value in (options or {}).items()}
    endpoint = options.get("AWS_ENDPOINT_URL") or options.get("AWS_ENDPOINT")
    scheme = "https"
    if endpoint and "://" in endpoint:
        scheme, endpoint = endpoint.split("://", 1)
    arguments = {"access_key": options.get("AWS_ACCESS_KEY_ID"), "secret_key": options.get("AWS_SECRET_ACCESS_KEY"),
                 "session_token": options.get("AWS_SESSION_TOKEN"), "region": options.get("AWS_REGION"),
                 "endpoint_override": endpoint, "scheme": scheme}
    if options.get("AWS_ALLOW_HTTP", "").lower() == "true" and not endpoint:
        arguments["scheme"] = "http"
    return pafs.S3FileSystem(**{k: v for k, v in arguments.items() if v}), uri.split("://", 1)[1].rstrip("/")


class ArtifactStore:
    """The store under `uri` for the artifacts of the FLYWHEEL_HOME `home` (see the module's text)."""

    def __init__(self, home: Path, uri: str, options: dict[str, str] | None = None):
        self.home, self.uri = Path(home).resolve(), uri
        self.fs, self.root = filesystem(uri, options)

    def key(self, path: Path) -> str:
        relative = Path(path).resolve().relative_to(self.home).as_posix()
        return f"{self.root}/{relative}"

    def holds(self, path: Path) -> bool:
        """Whether `path` is one the store mirrors: under FLYWHEEL_HOME (a model store elsewhere,
        FLYWHEEL_MODELS_DIR, is the shared-volume alternative and stays where it is)."""
        return Path(path).resolve().is_relative_to(self.home)

    # -- writing -----------------------------------------------------------------------------

    def publish(self, path: Path) -> None:
        """Upload a file, or a folder and then its marker (a new generation: readers download it again)."""
        path = Path(path)
        if not self.holds(path):
            return
        if path.is_file():
            self._upload(path, self.key(path))
            return
        # (dot names are markers, temporary copies and half-made folders)
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts)
                       and not _inside_published(p, path))
        for file in files:
            self._upload(file, self.key(file))
        marker = {"generation": uuid.uuid4().hex,
                  "files": {file.relative_to(path).as_posix(): file.stat().st_size for file in files}}
        text = json.dumps(marker, sort_keys=True)
        with self.fs.open_output_stream(f"{self.key(path)}/{MARKER}") as out:
            out.write(text.encode())
        (path / MARKER).write_text(text)

    def delete(self, path: Path) -> None:
        """Remove a file or a folder from the store (the local copy is the caller's)."""
        if not self.holds(path):
            return
        key = self.key(path)
        info = self.fs.get_file_info(key)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(key)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(key)

    # -- reading -----------------------------------------------------------------------------

    def fetch(self, path: Path) -> Path:
        """`path` made current from the store; unchanged when the store does not hold it."""
        path = Path(path)
        if not self.holds(path):
            return path
        marker = self._marker(path)
        if marker is not None:
            return self._fetch_folder(path, marker)
        info = self.fs.get_file_info(self.key(path))
        if info.type == pafs.FileType.File:
            if not (path.is_file() and path.stat().st_size == info.size and path.stat().st_mtime_ns == info.mtime_ns):
                self._download(self.key(path), path, info.mtime_ns)
        return path

    def listing(self, folder: Path) -> list[Path]:
        """The local paths of every file the store holds under `folder` (markers left out)."""
        if not self.holds(folder):
            return []
        selector = pafs.FileSelector(self.key(folder), recursive=True, allow_not_found=True)
        prefix = len(self.root) + 1
        return sorted(self.home / info.path[prefix:] for info in self.fs.get_file_info(selector)
                      if info.type == pafs.FileType.File and not info.path.endswith(f"/{MARKER}"))

    def _marker(self, folder: Path) -> dict | None:
        try:
            with self.fs.open_input_stream(f"{self.key(folder)}/{MARKER}") as stream:
                return json.loads(stream.read())
        except FileNotFoundError:  # (pyarrow's S3 client says so of a missing key; a denied one raises)
            return None

    def _fetch_folder(self, folder: Path, marker: dict) -> Path:
        local = folder / MARKER
        if local.is_file() and json.loads(local.read_text()) == marker:
            return folder
        for name in marker["files"]:
            self._download(f"{self.key(folder)}/{name}", folder / name)
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / f"{_TEMP_PREFIX}{uuid.uuid4().hex}{MARKER}"
        temporary.write_text(json.dumps(marker, sort_keys=True))
        temporary.replace(local)
        return folder

    def _upload(self, path: Path, key: str) -> None:
        if not isinstance(self.fs, pafs.S3FileSystem):  # a shared folder: no reader sees half a file
            self.fs.create_dir(key.rsplit("/", 1)[0], recursive=True)
            temporary = f"{key.rsplit('/', 1)[0]}/{_TEMP_PREFIX}{uuid.uuid4().hex}"
            pafs.copy_files(str(path), temporary, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
            self.fs.move(temporary, key)
        else:  # one PUT (or a multipart upload): the object appears whole or not at all
            pafs.copy_files(str(path), key, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def _download(self, key: str, path: Path, mtime_ns: int | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{_TEMP_PREFIX}{uuid.uuid4().hex}")
        try:
            pafs.copy_files(key, str(temporary), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
            if mtime_ns is not None:
                os.utime(temporary, ns=(mtime_ns, mtime_ns))
            temporary.replace(path)
        finally:
            temporary.unlink(missing_ok=True)


def _inside_published(file: Path, folder: Path) -> bool:
    """Whether `file` sits in a subfolder of `folder` that is published on its own (an adapter's
    merged weights): the parent's generation must not change with it."""
    for parent in file.relative_to(folder).parents:
        if parent != Path(".") and (folder / parent / MARKER).exists():
            return True
    return False


@lru_cache(maxsize=8)
def _store(home: str, uri: str, options: str) -> ArtifactStore:
    return ArtifactStore(Path(home), uri, json.loads(options) if options else None)


def artifact_store(home: Path, environ=None) -> ArtifactStore | None:
    """The store FLYWHEEL_ARTIFACTS_URI names for `home`, or None (artifacts stay local)."""
    environ = os.environ if environ is None else environ
    uri = environ.get(URI_VARIABLE)
    if not uri:
        return None
    return _store(str(Path(home).resolve()), uri,
                  environ.get(OPTIONS_VARIABLE) or environ.get("FLYWHEEL_STORAGE_OPTIONS") or "")


def publish(home: Path, *paths: Path | None) -> None:
    """Upload what the loop just wrote under `home` (a None, as a chart that was not drawn, is
    passed over), when an artifact store is configured."""
    if (store := artifact_store(home)) is not None:
        for path in paths:
            if path is not None and path.exists():
                store.publish(path)


def ensure_published(home: Path, path: Path) -> None:
    """Publish a folder the store does not hold yet (one made before the store was configured)."""
    if (store := artifact_store(home)) is not None and store.holds(path) and store._marker(path) is None:
        store.publish(path)


def local(home: Path, stored: str | Path) -> Path:
    """The local path of an artifact as the registry or a manifest names it (relative to home, or
    absolute), downloaded from the artifact store first when it has a newer copy."""
    path = Path(home) / stored
    store = artifact_store(home)
    return path if store is None else store.fetch(path)

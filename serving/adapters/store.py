"""The adapter store: finished adapters where every vLLM host can read them, immutable and content-addressed.

A store is a URL that fsspec opens: a directory (`/srv/adapters`, `file:///mnt/shared`, a shared volume)
or an S3-compatible bucket (`s3://bucket/prefix`, through s3fs; the endpoint and credentials come from
`PAIRLOOP_ADAPTER_STORE_OPTIONS` or the usual `AWS_*` variables). Its layout:

    blobs/sha256/<hex>          each file's bytes, named by their SHA-256
    adapters/<name>.json        the manifest: the adapter's files, their hashes and sizes

Publishing uploads the blobs first, each to a temporary key and then moved under its hash, and writes the
manifest last (also through a temporary key): an adapter is visible only once all its files are, and a
reader never sees part of a file under its final name. Names are immutable: publishing a name again with
other contents is refused. Fetching copies the files into a staging directory on the local disk, checks
every hash and size, and only then renames the directory to its final name, so a vLLM server is never
given a half-copied or corrupted adapter.

With no store configured (the embedded default) nothing is published: the trainer and vLLM share the data
dir, and vLLM loads adapters from there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, Field

from serving.errors import AdapterError

log = logging.getLogger(__name__)

STORE_REF = "store:"
"""Prefix of a routing path that names an adapter in the store rather than a directory on a shared disk."""

MAX_FILES = 64
MAX_FILE_BYTES = 4 << 30


class FileEntry(BaseModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0, le=MAX_FILE_BYTES)


class Manifest(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    files: dict[str, FileEntry]
    published_at: float = 0.0

    def same_contents(self, other: Manifest) -> bool:
        return self.name == other.name and self.files == other.files


def store_ref(name: str) -> str:
    return f"{STORE_REF}{name}"


def is_store_ref(path: str) -> bool:
    return path.startswith(STORE_REF)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _safe_relative(rel: str) -> PurePosixPath:
    """A manifest's file name as a relative path that stays inside the adapter's directory."""
    p = PurePosixPath(rel)
    if p.is_absolute() or not p.parts or any(part in ("", ".", "..") for part in p.parts):
        raise AdapterError(f"the manifest names an unsafe file path: {rel!r}", 502)
    return p


def local_manifest(directory: Path, name: str) -> Manifest:
    """The manifest of the adapter in `directory` (every regular file in it, recursively)."""
    files: dict[str, FileEntry] = {}
    for f in sorted(directory.rglob("*")):
        if f.is_file():
            files[f.relative_to(directory).as_posix()] = FileEntry(sha256=sha256_file(f), size=f.stat().st_size)
    if not files:
        raise AdapterError(f"{directory} holds no files to publish", 400)
    if len(files) > MAX_FILES:
        raise AdapterError(f"{directory} holds {len(files)} files; an adapter may have at most {MAX_FILES}", 400)
    return Manifest(name=name, files=files, published_at=time.time())


def verify(directory: Path, manifest: Manifest) -> str | None:
    """None when `directory` holds exactly the manifest's files with their hashes, else what differs."""
    for rel, entry in manifest.files.items():
        f = directory / _safe_relative(rel)
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != entry.size:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {entry.size}"
        if sha256_file(f) != entry.sha256:
            return f"{rel} does not match its SHA-256"
    return None


class AdapterStore:
    """Publish adapters to, and fetch them from, the store at `url` (any fsspec URL)."""

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        from fsspec.core import url_to_fs

        self.url = url
        try:
            self.fs, root = url_to_fs(url, **(options or {}))
        except (ImportError, ValueError) as exc:
            raise AdapterError(f"cannot open the adapter store {url}: {exc}", 503) from exc
        self.root = root.rstrip("/")
        self._local = "file" in _protocols(self.fs)

    def _key(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def manifest_key(self, name: str) -> str:
        return self._key("adapters", f"{name}.json")

    def blob_key(self, digest: str) -> str:
        return self._key("blobs", "sha256", digest)

    def _put_atomic(self, local: Path, key: str) -> None:
        """Upload `local` so that `key` appears complete or not at all."""
        tmp = self._key("tmp", f"{uuid.uuid4().hex}")
        if self._local:
            self.fs.makedirs(self._key("tmp"), exist_ok=True)
            self.fs.makedirs(key.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(local), tmp)
            os.replace(tmp, key)  # atomic on one filesystem
        else:
            # an S3 PUT (and the server-side copy of a move) makes an object visible whole or not at all
            self.fs.put_file(str(local), tmp)
            self.fs.mv(tmp, key)

    def manifest(self, name: str) -> Manifest | None:
        """The published manifest of `name`, or None."""
        try:
            raw = self.fs.cat_file(self.manifest_key(name))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AdapterError(f"cannot read {name} from the adapter store {self.url}: {exc}", 503) from exc
        manifest = Manifest.model_validate_json(raw)
        if manifest.name != name:
            raise AdapterError(f"the store's manifest for {name} names {manifest.name}", 502)
        return manifest

    def names(self) -> list[str]:
        """Names of the published adapters."""
        try:
            keys = self.fs.ls(self._key("adapters"), detail=False)
        except FileNotFoundError:
            return []
        return sorted(PurePosixPath(k).name.removesuffix(".json") for k in keys if str(k).endswith(".json"))

    def publish(self, name: str, directory: Path) -> Manifest:
        """Upload the adapter in `directory` as `name`: blobs first, the manifest last. Publishing the same
        contents again changes nothing; other contents under a published name are refused (409)."""
        manifest = local_manifest(directory, name)
        existing = self.manifest(name)
        if existing is not None:
            if existing.same_contents(manifest):
                return existing
            raise AdapterError(f"{name} is already published with other contents; names are immutable", 409)
        for rel, entry in manifest.files.items():
            key = self.blob_key(entry.sha256)
            if not self.fs.exists(key):
                self._put_atomic(directory / rel, key)
        staged = directory.parent / f".manifest-{uuid.uuid4().hex}.json"
        try:
            staged.write_text(manifest.model_dump_json(indent=2))
            self._put_atomic(staged, self.manifest_key(name))
        finally:
            staged.unlink(missing_ok=True)
        log.info("published %s to %s (%d files)", name, self.url, len(manifest.files))
        return manifest

    def fetch(self, name: str, dest: Path) -> Path:
        """`dest/name`, holding the adapter with every hash checked; copied from the store if not there yet."""
        final = dest / name
        manifest = self.manifest(name)
        if manifest is None:
            raise AdapterError(f"{name} is not in the adapter store {self.url}", 404)
        if final.is_dir():
            problem = verify(final, manifest)
            if problem is None:
                return final
            log.warning("the local copy of %s is damaged (%s): fetching it again", name, problem)
            shutil.rmtree(final)
        dest.mkdir(parents=True, exist_ok=True)
        staging = dest / f".fetch-{name}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            for rel, entry in manifest.files.items():
                target = staging / _safe_relative(rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(self.blob_key(entry.sha256), str(target))
            problem = verify(staging, manifest)
            if problem is not None:
                raise AdapterError(f"{name} from the adapter store failed its check: {problem}", 502)
            try:
                os.replace(staging, final)
            except OSError:
                if not final.is_dir():  # another fetch of the same name won: its copy is as good
                    raise
        except FileNotFoundError as exc:
            raise AdapterError(f"a file of {name} is missing from the adapter store: {exc}", 502) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("fetched %s from %s into %s", name, self.url, final)
        return final


def _protocols(fs: Any) -> set[str]:
    proto = fs.protocol
    return {proto} if isinstance(proto, str) else set(proto)


def open_store(url: str | None, options_json: str | dict[str, Any] | None = None) -> AdapterStore | None:
    """The store at `url` (None when none is configured)."""
    if not url:
        return None
    options = json.loads(options_json) if isinstance(options_json, str) else options_json
    return AdapterStore(url, options or {})

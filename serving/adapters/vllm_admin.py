"""vLLM's runtime LoRA endpoints (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`) and a probe request.

They are reached only from inside the deployment: vLLM listens on a private address, and anyone who can
call these endpoints changes what is served.
"""

from __future__ import annotations

import httpx

from serving.errors import AdapterError


class VllmAdmin:
    """vLLM's runtime LoRA endpoints and a probe request."""

    def __init__(self, client: httpx.AsyncClient, headers: dict[str, str] | None = None) -> None:
        self.client = client
        self.headers = headers or {}

    async def load(self, url: str, name: str, path: str) -> None:
        resp = await self._post(f"{url}/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        # Names are immutable, so "already loaded" means these very weights are there.
        if resp.status_code != 200 and "already been loaded" not in resp.text:
            raise AdapterError(f"vLLM at {url} did not load {name}: {resp.status_code} {resp.text[:300]}", 502)

    async def unload(self, url: str, name: str) -> None:
        resp = await self._post(f"{url}/v1/unload_lora_adapter", {"lora_name": name})
        if resp.status_code not in (200, 404):
            raise AdapterError(f"vLLM at {url} did not unload {name}: {resp.status_code} {resp.text[:300]}", 502)

    async def probe(self, url: str, name: str) -> None:
        body = {"model": name, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
        resp = await self._post(f"{url}/v1/chat/completions", body)
        if resp.status_code != 200:
            raise AdapterError(f"{name} on {url} failed its probe: {resp.status_code} {resp.text[:300]}", 502)

    async def _post(self, url: str, body: dict[str, object]) -> httpx.Response:
        try:
            return await self.client.post(url, json=body, headers=self.headers, timeout=60.0)
        except httpx.HTTPError as exc:
            raise AdapterError(f"could not reach vLLM at {url}: {exc!r}", 502) from exc

"""Each Valkey ACL user of deploy/redis_acl.py, on a real Valkey: what its role uses works, the rest is refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from deploy.local.redis_server import EmbeddedRedis
from deploy.redis_acl import ROLE_RULES, user_args


@pytest.fixture
def acl(tmp_path: Path) -> Iterator[dict[str, redis.Redis]]:
    server = EmbeddedRedis(tmp_path, "admin-password-0123")
    server.start()
    admin = redis.Redis.from_url(server.url)
    clients = {}
    for role in ROLE_RULES:
        admin.execute_command("ACL", "SETUSER", role, *user_args(role, f"{role}-pw"))
        clients[role] = redis.Redis(port=server.port, username=role, password=f"{role}-pw")
    admin.set("pairloop:routing", '{"champion": null}')
    admin.set("pairloop:completion:c1", "{}")
    try:
        yield clients
    finally:
        for c in [*clients.values(), admin]:
            c.close()
        server.stop()


def refused(call: object) -> bool:
    try:
        call()  # type: ignore[operator]
    except redis.exceptions.NoPermissionError:
        return True
    return False


def test_each_role_can_do_its_work_and_nothing_else(acl: dict[str, redis.Redis]) -> None:
    gw, tr, wk, cr, sc = (acl[r] for r in ("gateway", "trainer", "worker", "cron", "adapter-sync"))
    # the routing record: the gateways and the trainer write it, a sidecar reads it, the others do not touch it
    for client in (gw, tr):
        assert client.set("pairloop:routing", '{"champion": "pl-v0001"}')
    assert sc.get("pairloop:routing") == b'{"champion": "pl-v0001"}'
    for client in (wk, cr, sc):
        assert refused(lambda c=client: c.set("pairloop:routing", '{"champion": "evil"}'))
    assert refused(lambda: wk.get("pairloop:routing")) and refused(lambda: cr.get("pairloop:routing"))
    # a worker reads the served records and cannot change them
    assert wk.get("pairloop:completion:c1") == b"{}"
    assert refused(lambda: wk.set("pairloop:completion:c1", "forged"))
    # the queues: every RQ role; not the sidecar
    for client in (gw, tr, wk, cr):
        assert client.rpush("rq:queue:pairloop-feedback", "job") >= 1
        assert client.info("server")["redis_version"]
    assert refused(lambda: sc.rpush("rq:queue:pairloop-feedback", "forged-job"))
    assert refused(lambda: sc.lrange("rq:queue:pairloop-feedback", 0, -1))
    # the sidecar's own report
    assert sc.hset("pairloop:adapter-hosts", "http://vllm:8001", "{}") == 1
    assert refused(lambda: sc.hset("pairloop:routing-other", "x", "y"))
    assert refused(lambda: cr.set("pairloop:training:lock", "x")) and cr.set("pairloop:cron:x", "1")
    # nobody flushes, reconfigures, lists every key or watches every command
    for client in acl.values():
        assert refused(client.flushall)
        assert refused(lambda c=client: c.config_set("appendonly", "no"))
        assert refused(lambda c=client: c.keys("*"))
        assert refused(lambda c=client: c.execute_command("ACL", "SETUSER", "x", "on", ">pw", "+@all", "~*"))

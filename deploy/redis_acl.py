"""The Valkey/Redis ACL users of a deployment across hosts: one per role, each with only the keys and commands it
uses (docs/SECURITY.md, "Redis").

Redis is pairloop's control plane: the routing record says which adapter every gateway serves, and a queued job
names the function a worker runs. With one password for everyone, any part (a sidecar, cron) could rewrite the
routing record or flush the queues. With these users:

- only the gateways and the trainer write `pairloop:*` (the routing record, records, claims, the round lock);
- a feedback worker reads the served records and works the queues (`rq:*`), nothing else;
- cron works the queues and keeps its own schedule (`pairloop:cron:*`);
- a sidecar reads the routing record and the wanted list and writes its own report, with a handful of commands;
- nobody runs what Valkey calls dangerous (FLUSHALL, CONFIG, DEBUG, KEYS, MONITOR, SHUTDOWN, …) but `INFO`, which
  RQ reads for the server's version and the gateway for memory admission.

The default user (REDIS_PASSWORD) stays for the operator and the health check; no pairloop service holds it.
deploy/compose.yaml and the trial overlay's Valkey declare these users with `--user`; tests check that they say
what `ROLE_RULES` says, and that each user is refused outside its role. `pairloop up`'s embedded Redis, on one
machine and one user account, keeps one password.
"""

from __future__ import annotations

QUEUES = "~rq:* &rq:*"
"""RQ's keys and its pub/sub channels (worker commands)."""

ROLE_RULES: dict[str, str] = {
    "gateway": f"{QUEUES} ~pairloop:* +@all -@dangerous +info",
    "trainer": f"{QUEUES} ~pairloop:* +@all -@dangerous +info",
    "worker": f"{QUEUES} %R~pairloop:completion:* +@all -@dangerous +info",
    "cron": f"{QUEUES} ~pairloop:cron:* +@all -@dangerous +info",
    "adapter-sync": "%R~pairloop:routing %R~pairloop:adapter-wanted ~pairloop:adapter-hosts -@all +@connection "
    "-@dangerous +get +zrangebyscore +hset +hdel",
}
"""Each role's ACL rules (Valkey's `ACL SETUSER` syntax, after `on` and the password)."""


def user_args(role: str, password: str) -> list[str]:
    """`ACL SETUSER <role> …` arguments (and `--user <role> …` ones) for `role` with `password`."""
    return ["on", f">{password}", *ROLE_RULES[role].split()]

"""The adapter control plane: which LoRA adapter serves, and getting it onto every vLLM host.

routing.py    the routing record in Redis (champion, challenger, A/B share), its transitions, and the swap that
              loads and probes an adapter on every backend before it flips the record
router.py     the gateway's side (`AdapterRouter`): follow the record, pick each choice's adapter, count what is
              in flight, unload what no longer serves, ready a new or restarted backend
vllm_admin.py vLLM's runtime LoRA endpoints and the probe request
store.py      the content-addressed adapter store the trainer publishes to (a directory, or S3 through fsspec)
sync.py       the sidecar that copies wanted adapters from the store onto a vLLM host's disk
hosts.py      where each vLLM host keeps its adapters (the path a load names)
"""

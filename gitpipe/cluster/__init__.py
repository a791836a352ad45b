"""Actions on worker hosts, through Celery on a Redis broker (SPEC section 13).

Imported only when gitpipe.toml has a `[cluster]` table (or by `gitpipe worker(s)`): a
one-host setup never loads Celery or Redis. Three modules, one side each:

- `channel`: what crosses Redis and how: key names, sealing to a worker's key, result
  MACs, artifacts packed with their sha256, log streams. The one home of redis-py and of
  the cryptography these use.
- `dispatch`: the coordinator's side: which actions go where, sending an attempt, taking
  its log and result back into the store (the coordinator stays the only SQLite writer).
- `worker`: the worker host's side: the Celery app and its one task, run in the same
  sandbox as on the build host (`gitpipe.sandbox`).

The trust line: a worker host runs pushed code (like the sandbox) and holds only what
one attempt needs, for as long as it runs; secrets and keys stay on the coordinator.
"""

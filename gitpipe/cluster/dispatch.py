"""The coordinator's side of the cluster: where an action runs, and one remote attempt.

`Cluster.place` decides (deploys, approvals and plugin types always stay here; `runs_on`
labels go to a worker with every label; unlabeled actions stay here with `local = true`).
`Cluster.attempt` is what `RunWorker._run_action` calls instead of its local attempt: it
records the attempt, waits for a live worker that can take it (saying why in the
action's message and log), sends it through Celery, answers the worker's claim with the
attempt's secrets sealed to that worker's key, writes the streamed output to the
attempt's log file, and records the result once, only if it carries the attempt's MAC.
A worker whose heartbeat stops mid-attempt: the attempt is `interrupted` and sent again.
"""

from __future__ import annotations

import json
import logging
import os
import secrets as secrets_mod
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from gitpipe import artifacts, attempts, executor
from gitpipe.cluster import channel
from gitpipe.cluster.worker import make_app
from gitpipe.errors import GitpipeError
from gitpipe.models import ActionRecord, ActionSpec, ActionStatus, Pipeline
from gitpipe.settings import ClusterSettings, Settings

if TYPE_CHECKING:
    from gitpipe.scheduler import RunWorker

log = logging.getLogger("gitpipe")
POLL = 1.0  # seconds between looks at the workers while an attempt waits or runs
REMOTE = "remote:"  # the token of an attempt on a worker: remote:<aid>:<result key, hex>
UNCLAIMED_CHECK = 5.0  # seconds between looks at the workers while an attempt is still queued
LATE = 30.0  # seconds past its deadline a remote attempt is given to report before it is ended here


@dataclass
class WorkerInfo:
    name: str
    labels: tuple[str, ...]
    slots: int
    running: tuple[str, ...]
    heartbeat: str
    host: str = ""

    def json(self) -> dict[str, Any]:
        return {"name": self.name, "labels": list(self.labels), "slots": self.slots,
                "running": len(self.running), "attempts": list(self.running),
                "heartbeat": self.heartbeat, "host": self.host}


def live_workers(r: channel.Client) -> list[WorkerInfo]:
    """The workers whose heartbeat has not expired, by name."""
    keys = sorted(r.scan_iter(match=channel.key("worker", "*"), count=500))
    found = []
    for raw in r.mget(keys) if keys else []:
        if raw:
            d = json.loads(raw)
            found.append(WorkerInfo(d["name"], tuple(d["labels"]), d["slots"], tuple(d["running"]),
                                    d["heartbeat"], d.get("host", "")))
    return found


@dataclass
class RemoteAttempt:
    """What `RunWorker` stops on a cancel or a daemon stop, like a local `executor.Attempt`."""

    r: channel.Client
    aid: str
    stopped_as: ActionStatus | None = None
    reason: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def stop(self, status: ActionStatus, reason: str, grace: float = executor.KILL_GRACE) -> None:
        with self._lock:
            if self.stopped_as is None:
                self.stopped_as, self.reason = status, reason
        if status is ActionStatus.INTERRUPTED and reason == "daemon stopped":
            return  # the attempt goes on on its worker; the next daemon takes it up
        try:
            self.r.set(channel.key("stop", self.aid), status.value, ex=channel.KEEP)
        except redis.RedisError:
            pass  # the worker, cut off too, ends it itself


class Cluster:
    def __init__(self, settings: Settings, conf: ClusterSettings) -> None:
        self.settings, self.conf = settings, conf
        self.app = make_app(conf.broker)
        self.r = channel.connect(conf.broker)
        self.trusted = dict(conf.workers)
        self.signing = channel.load_signing(settings.home / "coordinator.key")  # workers hold its public half

    def place(self, pipe: Pipeline, spec: ActionSpec) -> tuple[str, ...] | None:
        """The labels a worker needs to run this action; None: it runs here."""
        if spec.type != "run":  # deploys hold keys, approvals wait for people, plugins live here
            return None
        labels = spec.runs_on if spec.runs_on is not None else pipe.runs_on
        if not labels and self.conf.local:
            return None
        return labels

    def close(self) -> None:
        self.r.close()

    # ------------------------------------------------------------------ one attempt
    def attempt(self, rw: RunWorker, rec: ActionRecord, spec: ActionSpec, labels: tuple[str, ...]
                ) -> executor.Outcome:
        """Attempts on workers until one reports (a lost worker's attempt is sent again)."""
        while True:
            outcome = self._one(rw, rec, spec, labels)
            if outcome.status is ActionStatus.INTERRUPTED and not rw.halted:
                continue
            return outcome

    def owns(self, token: str) -> bool:
        """Whether an open attempt (after a restart) is one on a worker: its run takes it up again."""
        return token.startswith(REMOTE)

    def _one(self, rw: RunWorker, rec: ActionRecord, spec: ActionSpec, labels: tuple[str, ...]
             ) -> executor.Outcome:
        store, run = rw.store, rw.run
        previous = store.attempts(rec.id)
        env, masker = rw._env(spec, len(previous) + 1)
        secret_env = {name: env.pop(name) for name in spec.secrets if name in env}
        last = previous[-1] if previous else None
        if last is not None and last.status is ActionStatus.RUNNING and self.owns(last.token):
            # Left running on a worker by a daemon that stopped or died: found again, not run twice.
            number, deadline, log_path = last.number, float(last.deadline or time.time()), Path(last.log_path)
            aid, mac_hex = last.token[len(REMOTE):].rsplit(":", 1)
            mac, adopted = bytes.fromhex(mac_hex), True
            if store.action(rec.id).status is not ActionStatus.RUNNING:
                store.set_action(rec.id, ActionStatus.RUNNING)
        else:
            deadline = rw._deadline(spec, previous) or time.time() + spec.timeout
            number = len(previous) + 1
            log_path = attempts.log_path(self.settings, run.id, rec.id, rec.name, number)
            aid, mac, adopted = f"{rec.id}.{number}.{secrets_mod.token_hex(8)}", os.urandom(32), False
            # The result key is kept in the database (the coordinator's alone) for a restart's sake.
            store.start_attempt(rec.id, deadline, str(log_path), f"{REMOTE}{aid}:{mac.hex()}")
        writer = executor.LogWriter(log_path, masker.stream(), self.settings.max_log_size)
        handle = RemoteAttempt(self.r, aid)
        with rw.lock:
            rw.attempts[rec.id] = handle  # type: ignore[assignment]
        outcome = executor.Outcome(ActionStatus.FAILED, None)
        session = Session(self, rw, rec, spec, labels, aid, deadline, env, secret_env, writer, handle, mac)
        try:
            outcome = session.adopt() if adopted else session.run()
            self._record_caches(rw, rec.id, number, getattr(outcome, "result", {}))
            if outcome.status is ActionStatus.SUCCEEDED:
                outcome = self._collect(rw, rec, spec, aid, outcome, writer, masker)
        except (GitpipeError, OSError, redis.RedisError) as exc:
            writer.line(f"gitpipe: {exc}")
            outcome = executor.Outcome(ActionStatus.FAILED, outcome.exit_code, str(exc))
        finally:
            with rw.lock:
                rw.attempts.pop(rec.id, None)
            if session.detached:  # the daemon stops: the worker goes on, the next daemon takes it up
                writer.line(f"gitpipe: daemon stopped; attempt {number} goes on on worker {session.worker}")
            else:
                self._clean(aid, spec)
                if outcome.message and not outcome.status.ok:
                    writer.line(f"gitpipe: attempt {number} {outcome.status.value}: {outcome.message}")
            writer.close()
            if not session.detached:
                store.finish_attempt(rec.id, number, outcome.status, outcome.exit_code)
            if outcome.status is ActionStatus.INTERRUPTED and not rw.halted:
                store.set_action(rec.id, ActionStatus.RUNNING, message=outcome.message)
        return outcome

    def _collect(self, rw: RunWorker, rec: ActionRecord, spec: ActionSpec, aid: str,
                 outcome: executor.Outcome, writer: executor.LogWriter, masker: Any) -> executor.Outcome:
        """Take the outputs the worker sent (sha256 checked) into the run's artifacts, as a local run does."""
        result = getattr(outcome, "result", {})
        dest = self.settings.artifacts_dir / str(rw.run.id)
        budget = artifacts.Budget(self.settings.max_artifact_size)
        sent = dict(result.get("outputs", []))
        for name, patterns in spec.outputs:
            if name not in sent:
                raise GitpipeError(f'artifact "{name}": the worker sent none')
            with tempfile.TemporaryDirectory(dir=self.settings.home) as tmp:
                channel.unpack(self.r.get(channel.key("out", aid, name)), sent[name], Path(tmp), f'artifact "{name}"')
                art = artifacts.store(Path(tmp), dest, rw.run.id, rec.name, name, patterns, budget)
            rw.store.add_artifact(art)
            writer.line(f"gitpipe: artifact {name}: {art.files} file(s), {art.size} bytes, sha256 {art.sha256} "
                        f"(sent as a tar with sha256 {sent[name]}, checked)")
        values = {str(k): str(v) for k, v in result.get("values", {}).items()}
        if values:
            rw.store.set_outputs(rw.run.id, rec.name, {masker.mask(k): masker.mask(v) for k, v in values.items()})
        return executor.Outcome(ActionStatus.SUCCEEDED, 0)

    def _record_caches(self, rw: RunWorker, action_id: int, number: int, result: dict[str, Any]) -> None:
        """What the worker restored and saved, shown as a local action's caches are (show, the run page)."""
        from gitpipe.cache import use_from

        reported = result.get("caches")
        for d in reported if isinstance(reported, list) else []:
            if isinstance(d, dict):
                try:
                    rw.store.record_cache_use(use_from(d, action_id, number))
                except GitpipeError as exc:  # a full disk: the action's result matters more
                    log.warning("run #%s: could not record a cache use: %s", rw.run.id, exc)

    def _clean(self, aid: str, spec: ActionSpec) -> None:
        try:
            pipe = self.r.pipeline()
            pipe.set(channel.key("done", aid), "1", ex=2 * channel.KEEP)
            pipe.delete(channel.key("log", aid), channel.key("stop", aid))
            for name in spec.inputs:
                pipe.delete(channel.key("in", aid, name))
            for name, _ in spec.outputs:
                pipe.delete(channel.key("out", aid, name))
            pipe.execute()
        except redis.RedisError as exc:  # they expire by themselves
            log.warning("cluster: could not clean up attempt %s on the broker: %s", aid, exc)


@dataclass
class _Outcome(executor.Outcome):
    result: dict[str, Any] = field(default_factory=dict)


class Session:
    """One remote attempt from sending to its result."""

    def __init__(self, cluster: Cluster, rw: RunWorker, rec: ActionRecord, spec: ActionSpec,
                 labels: tuple[str, ...], aid: str, deadline: float, env: dict[str, str],
                 secret_env: dict[str, str], writer: executor.LogWriter, handle: RemoteAttempt,
                 mac: bytes) -> None:
        self.c, self.rw, self.rec, self.spec, self.labels = cluster, rw, rec, spec, labels
        self.aid, self.deadline, self.env, self.secret_env = aid, deadline, env, secret_env
        self.writer, self.handle = writer, handle
        self.stream = channel.key("log", aid)
        self.shown: str | None = None
        self.worker: str | None = None
        self.mac = mac
        self.detached = False
        self.broker_back = 0.0  # monotonic time the broker was last seen away
        self.chunk = 0  # the number of the last log chunk taken (each carries its MAC)
        self.forged = False  # a chunk without a valid MAC was dropped (said once)
        self.missed = 0  # looks in a row that did not find the attempt in its worker's heartbeat
        self.idle_seen = False  # a worker that could take the queued attempt stood idle at the last look

    def say(self, why: str) -> None:
        """The reason the action waits: in its message (show, runs, the run page) and its log."""
        if why != self.shown:
            self.shown = why
            self.rw.store.set_action(self.rec.id, ActionStatus.RUNNING, message=why)
            self.writer.line(f"gitpipe: {why}")

    def run(self) -> executor.Outcome:
        job = self._send()
        if not isinstance(job, dict):
            return job
        return self._follow(job)

    def adopt(self) -> executor.Outcome:
        """Take up an attempt a previous daemon left on a worker: its stream holds what was not read yet."""
        try:
            self.worker = next((w.name for w in live_workers(self.c.r) if self.aid in w.running), None)
        except redis.RedisError:
            self.worker = None
        self.writer.line("gitpipe: daemon restarted; attempt taken up again"
                         + (f" on worker {self.worker}" if self.worker else ""))
        if self.worker is None:  # it ended meanwhile (its result is in the stream), or its worker is gone
            self.worker = "?"
        return self._follow({})

    def _ended(self) -> executor.Outcome | None:
        if self.handle.stopped_as is not None:
            return executor.Outcome(self.handle.stopped_as, None, self.handle.reason)
        if time.time() >= self.deadline:
            what = f"a worker with labels {', '.join(self.labels)}" if self.labels else "a worker"
            return executor.Outcome(ActionStatus.TIMED_OUT, None, f"timed out waiting for {what}")
        return None

    def _send(self) -> dict[str, Any] | executor.Outcome:
        """Wait for a live worker with every label, then send the attempt to the labels' queue."""
        want = set(self.labels)
        while True:
            ended = self._ended()
            if ended is not None:
                return ended
            try:
                live = live_workers(self.c.r)
                if any(want <= set(w.labels) for w in live):
                    job = self._job()
                    self.c.app.send_task(channel.TASK, args=[job], queue=channel.queue_of(self.labels))
                    self.say(f"queued for a worker with labels {', '.join(self.labels)}" if self.labels
                             else "queued for a worker")
                    return job
                self.say(f"waiting for a worker with labels {', '.join(self.labels)}" if self.labels
                         else "waiting for a worker (none is live)")
            except (redis.RedisError, OSError) as exc:  # kombu raises OSError subclasses
                self.say(f"waiting for the broker ({type(exc).__name__}: {exc})")
            time.sleep(POLL)

    def _job(self) -> dict[str, Any]:
        inputs = []
        for art in self.rw.store.artifacts(self.rw.run.id):
            if art.name in self.spec.inputs:
                root = Path(art.path)
                data, sha256 = channel.pack(root, channel.tree_files(root))
                self.c.r.set(channel.key("in", self.aid, art.name), data, ex=channel.KEEP)
                inputs.append([art.name, sha256])
        repo_path = self.rw.store.repo_path(self.rw.run.repo)
        return {
            "aid": self.aid, "repo": self.rw.run.repo, "sha": self.rw.run.sha,
            "git_url": self.c.conf.git_url.format(path=repo_path, repo=self.rw.run.repo),
            "script": self.spec.run or "", "env": self.env, "inputs": inputs,
            "outputs": [[name, list(globs)] for name, globs in self.spec.outputs],
            "timeout": max(1.0, self.deadline - time.time()),
            "network": self.rw.host.sandbox.network(self.rw.pipe.network, self.spec.network),
            "protected": self.rw._protected(),  # its slots and caches: never a feature branch's
            "run": self.rw.run.id, "action": f"{self.rw.pipe.stage_of(self.spec)}/{self.spec.name}",
            "cache": [{"key": list(c.key), "paths": list(c.paths)} for c in self.spec.cache],
            "secrets": bool(self.spec.secrets),  # an entry saved with secrets is never restored by a feature branch
        }

    def _follow(self, job: dict[str, Any]) -> executor.Outcome:
        last, lost_check = "0-0", 0.0
        while True:
            try:
                entries = self.c.r.xread({self.stream: last}, block=int(POLL * 1000), count=200)
            except redis.RedisError as exc:
                self.say(f"waiting for the broker ({type(exc).__name__}: {exc})")
                time.sleep(POLL)
                self.broker_back = time.monotonic()
                entries = []
            else:
                if self.worker and (self.shown or "").startswith("waiting for the broker"):
                    self.say(f"running on worker {self.worker}")
            for _, items in entries:
                for entry_id, fields in items:
                    last = entry_id
                    done = self._entry(job, {k.decode(): v for k, v in fields.items()})
                    if done is not None:
                        return done
                self._forget([entry_id for entry_id, _ in items])
            now = time.time()
            if self.handle.stopped_as is not None and self.worker is None:
                return executor.Outcome(self.handle.stopped_as, None, self.handle.reason)
            if self.handle.stopped_as is ActionStatus.INTERRUPTED and self.handle.reason == "daemon stopped":
                self.detached = True
                return executor.Outcome(ActionStatus.INTERRUPTED, None, "daemon stopped; goes on on its worker")
            if now >= self.deadline and self.worker is None:
                return self._ended() or executor.Outcome(ActionStatus.TIMED_OUT, None, "timed out")
            if now >= self.deadline:
                self.handle.stop(ActionStatus.TIMED_OUT, "timed out")
                if now >= self.deadline + LATE:
                    return executor.Outcome(ActionStatus.TIMED_OUT, None, f"timed out (worker {self.worker} "
                                            "did not report its end)")
            if self.worker is None and now - lost_check >= UNCLAIMED_CHECK:
                lost_check = now
                self._unclaimed(job)
            if self.worker is not None and now - lost_check >= channel.HEARTBEAT_EVERY:
                lost_check = now
                gone = self._lost()
                if gone is not None:
                    return gone

    def _unclaimed(self, job: dict[str, Any]) -> None:
        """Still in the queue: say whether a worker could take it; send it again when one that
        could has stood idle through two looks (the worker that took it died before claiming)."""
        try:
            live = [w for w in live_workers(self.c.r) if set(self.labels) <= set(w.labels)]
            if not live:
                self.idle_seen = False
                self.say(f"waiting for a worker with labels {', '.join(self.labels)}" if self.labels
                         else "waiting for a worker (none is live)")
                return
            self.say(f"queued for a worker with labels {', '.join(self.labels)}" if self.labels
                     else "queued for a worker")
            idle = any(len(w.running) < w.slots for w in live)
            if idle and self.idle_seen:
                self.c.app.send_task(channel.TASK, args=[job], queue=channel.queue_of(self.labels))
                idle = False
            self.idle_seen = idle
        except (redis.RedisError, OSError) as exc:
            self.say(f"waiting for the broker ({type(exc).__name__}: {exc})")

    def _forget(self, ids: list[bytes]) -> None:
        """Entries written to the log are dropped from the stream: a restarted daemon reads only the rest."""
        try:
            if ids:
                self.c.r.xdel(self.stream, *ids)
        except redis.RedisError:
            pass

    def _lost(self) -> executor.Outcome | None:
        # After the broker was away, heartbeats that expired meanwhile are not news: a live
        # worker beats again within a second, so it counts as lost only after a whole TTL.
        if time.monotonic() - self.broker_back < channel.HEARTBEAT_TTL:
            return None
        try:
            raw = self.c.r.get(channel.key("worker", self.worker or ""))
            if raw is None and self.worker == "?":  # taken up after a restart: whoever runs it
                raw = next((json.dumps({"running": [self.aid]}) for w in live_workers(self.c.r)
                            if self.aid in w.running), None)
        except redis.RedisError:
            return None  # the broker is away: nothing can be told yet
        if raw is not None and self.aid in json.loads(raw)["running"]:
            self.missed = 0
            return None
        self.missed += 1
        if self.missed < 2:  # one look can cross a beat being written: lost only when two agree
            return None
        try:
            self.c.r.set(channel.key("stop", self.aid), ActionStatus.INTERRUPTED.value, ex=channel.KEEP)
        except redis.RedisError:
            pass
        why = f"worker {self.worker} lost (no heartbeat for {channel.HEARTBEAT_TTL} s); started again"
        return executor.Outcome(ActionStatus.INTERRUPTED, None, why)

    def _entry(self, job: dict[str, Any], fields: dict[str, bytes]) -> executor.Outcome | None:
        kind = fields.get("k", b"").decode()
        if kind == "claim":
            self._claim(job, fields.get("w", b"").decode())
        elif kind == "out" and self.worker is not None:
            data, n = fields.get("d", b""), fields.get("n", b"")
            number = int(n) if n.isdigit() else 0
            if number > self.chunk and channel.verify_chunk(self.mac, self.aid, number, data,
                                                            fields.get("mac", b"").decode(errors="replace")):
                self.chunk = number
                self.writer.write(data)
            elif not self.forged:
                self.forged = True
                self.writer.line("gitpipe: log lines without this attempt's MAC were dropped")
                log.warning("cluster: attempt %s: log lines without its MAC were dropped", self.aid)
        elif kind == "end" and self.worker is not None:
            body = fields.get("b", b"").decode()
            if not channel.verify(self.mac, body, fields.get("mac", b"").decode()):
                self.writer.line("gitpipe: a result without this attempt's signature was ignored")
                log.warning("cluster: attempt %s: a result without its signature was ignored", self.aid)
                return None
            result = json.loads(body)
            status = self.handle.stopped_as or ActionStatus(result["status"])
            message = self.handle.reason if self.handle.stopped_as else result.get("message")
            return _Outcome(status, result.get("exit_code"), message, result=result)
        return None

    def _claim(self, job: dict[str, Any], name: str) -> None:
        """The first trusted worker to claim the attempt gets its sealed secrets; any other a refusal."""
        reply = channel.key("seal", self.aid, name)
        public = self.c.trusted.get(name)
        if self.worker is not None or public is None:
            self.c.r.rpush(reply, b"refused")
            self.c.r.expire(reply, channel.KEEP)
            if public is None and self.worker is None:  # it took the task from the queue: send it again
                self.writer.line(f'gitpipe: worker "{name}" is not listed under [cluster.workers] in gitpipe.toml; '
                                 "it was refused the attempt (add the key it prints at start to trust it)")
                time.sleep(POLL)
                self.c.app.send_task(channel.TASK, args=[job], queue=channel.queue_of(self.labels))
            return
        self.worker = name
        bundle = {"mac": self.mac.hex(), "env": self.secret_env, "mask": list(self.secret_env.values()),
                  "digest": channel.digest(job),
                  "grant": channel.grant(self.c.signing, self.aid, name, channel.digest(job))}
        self.c.r.rpush(reply, channel.seal(public, json.dumps(bundle).encode()))
        self.c.r.expire(reply, 60)
        self.say(f"running on worker {name}")

"""A worker host: `gitpipe worker`, a Celery worker whose one task runs one gitpipe attempt.

The task (`WorkerHost.run`): claim the attempt on its log stream, wait for the coordinator
to seal the attempt's secrets and result key to this worker's key, check the grant the
coordinator signed (attempt, this worker, the job's digest, expiry) and that the attempt
never ran here (the `ran` record in --dir), fetch the commit with
git into a local mirror, restore the inputs (sha256 checked), run the script in the same
sandbox as the build host, stream its masked output back, upload the outputs (with their
sha256) and sign the result. A heartbeat thread keeps this worker listed, stops attempts
the coordinator asks to stop, and ends every attempt when the broker has been out of reach
longer than the coordinator waits (their results could not be recorded anyway).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from gitpipe import artifacts, executor, git, repos
from gitpipe import cache as cache_mod
from gitpipe import settings as settings_mod
from gitpipe.cluster import channel
from gitpipe.cluster.channel import redact
from gitpipe.errors import GitpipeError, UsageError
from gitpipe.intake import now_iso
from gitpipe.masking import Masker
from gitpipe.models import ActionStatus, CacheSpec
from gitpipe.sandbox import Confine, Sandbox
from gitpipe.scheduler import _read_outputs
from gitpipe.store import Store

log = logging.getLogger("gitpipe")
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # as runs_on takes them (pipeline.py)
SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
SEAL_WAIT = 30  # seconds a claimed attempt waits for its sealed secrets
END_WAIT = 600  # seconds a finished attempt keeps trying to send its result to a broker that is away
CACHE_LISTED = 1000  # cache entries a heartbeat lists (the most recently used)


def make_app(broker: str) -> Celery:
    """The Celery app of both sides: late acks (a task a dead worker held is not lost), one at a time."""
    plain, tls = channel.tls(broker)
    app = Celery("gitpipe", broker=plain, set_as_current=False)
    app.conf.update(
        task_acks_late=True, worker_prefetch_multiplier=1, task_ignore_result=True,
        task_serializer="json", accept_content=["json"], worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True, broker_connection_max_retries=None,
        # A redelivered task (a long attempt outliving this) finds its attempt claimed and stops.
        broker_transport_options={"visibility_timeout": channel.KEEP},
    )
    if tls:
        app.conf.broker_use_ssl = tls
    return app


@dataclass
class _Running:
    attempt: executor.Attempt | None = None
    stop: str | None = None


def add(r: channel.Client, stream: str, fields: dict[str, Any]) -> None:
    """Append to an attempt's stream, which expires if no coordinator ever reads it (an attempt
    that ended without this worker, a coordinator that never came back)."""
    pipe = r.pipeline()
    pipe.xadd(stream, fields)
    pipe.expire(stream, channel.KEEP)
    pipe.execute()


class StreamLog:
    """The LogWriter of a remote attempt: masked output appended to the attempt's stream."""

    def __init__(self, r: channel.Client, stream: str, masker: Masker, aid: str, secret: bytes) -> None:
        self.r, self.stream, self.mask = r, stream, masker.stream()
        self.aid, self.secret, self.n = aid, secret, 0
        self.error: OSError | None = None

    def write(self, data: bytes) -> None:
        self._send(self.mask.feed(data))

    def line(self, text: str) -> None:
        self._send(self.mask.feed(b"\n" + text.encode() + b"\n"))

    def _send(self, data: bytes) -> None:
        if data:
            try:
                self.n += 1
                add(self.r, self.stream, {"k": "out", "d": data, "n": str(self.n),
                                          "mac": channel.chunk_mac(self.secret, self.aid, self.n, data)})
            except redis.RedisError:  # cut off: the coordinator takes the attempt as lost
                pass

    def close(self) -> None:
        self._send(self.mask.flush())


class WorkerHost:
    def __init__(self, broker: str, labels: list[str], slots: int, name: str, directory: Path,
                 coordinator: str, cache_max_size: int | None = None) -> None:
        self.coordinator = channel.coordinator_key(coordinator)
        self.ran = directory / "ran"  # `<aid> <expiry>` of every granted attempt run here: no replay
        self.broker, self.labels, self.slots, self.name, self.dir = broker, sorted(set(labels)), slots, name, directory
        self.settings = settings_mod.load(directory, must_exist=False)  # its own [sandbox] and [cache], if any
        if cache_max_size is not None:
            self.settings = replace(self.settings, cache_max_size=cache_max_size)
        self.sandbox = Sandbox.for_host(self.settings)
        # Its own build caches (SPEC section 14), kept in --dir and indexed in its own database
        # there, under the same rules as the build host's: exact/warm/none, a protected run
        # restores only what protected runs saved (the job's sealed `protected`), atomic saves, LRU.
        self.store = Store(self.settings)
        self.caches = cache_mod.Caches(self.settings, self.store, self.sandbox.uid, self.sandbox.gid,
                                       userns=self.sandbox.bwrap is not None and self.sandbox.uid is None,
                                       host=name)
        self.caches.sweep()
        self.private = channel.load_private(directory / "worker.key")
        self.r = channel.connect(broker)
        self.running: dict[str, _Running] = {}
        self.lock = threading.Lock()
        self.fetch_locks: dict[str, threading.Lock] = {}
        self.stopping = threading.Event()

    # ------------------------------------------------------------------ heartbeat
    def beat_forever(self) -> None:
        last_ok = time.monotonic()
        while not self.stopping.wait(channel.HEARTBEAT_EVERY / 2):
            try:
                self.beat()
                last_ok = time.monotonic()
            except redis.RedisError as exc:
                if time.monotonic() - last_ok > channel.HEARTBEAT_TTL:
                    self._stop_all(ActionStatus.INTERRUPTED, f"worker cut off from the broker: {exc}")

    def beat(self) -> None:
        with self.lock:
            aids = list(self.running)
        info = {"name": self.name, "labels": self.labels, "slots": self.slots, "running": aids,
                "heartbeat": now_iso(), "host": socket.gethostname(), "pid": os.getpid()}
        held = [cache_mod.entry_json(e) for e in self.store.cache_entries()[-CACHE_LISTED:]]  # LRU first
        pipe = self.r.pipeline()
        pipe.set(channel.key("worker", self.name), json.dumps(info), ex=channel.HEARTBEAT_TTL)
        pipe.set(channel.key("caches", self.name), json.dumps(held), ex=channel.HEARTBEAT_TTL)
        for aid in aids:
            pipe.get(channel.key("stop", aid))
        stops = pipe.execute()[2:]
        for aid, stop in zip(aids, stops):
            if stop:
                self._stop(aid, ActionStatus(stop.decode()), "stopped by the coordinator")

    def _stop(self, aid: str, status: ActionStatus, reason: str) -> None:
        with self.lock:
            run = self.running.get(aid)
            if run is None or run.stop is not None:
                return
            run.stop = status.value
            attempt = run.attempt
        if attempt is not None:
            threading.Thread(target=attempt.stop, args=(status, reason), daemon=True).start()

    def _stop_all(self, status: ActionStatus, reason: str) -> None:
        with self.lock:
            aids = list(self.running)
        for aid in aids:
            self._stop(aid, status, reason)

    # ------------------------------------------------------------------ one attempt
    def run(self, job: dict[str, Any]) -> None:
        """The Celery task's body."""
        aid = job["aid"]
        stream = channel.key("log", aid)
        if self.r.exists(channel.key("done", aid)):
            return  # redelivered after the attempt ended
        with self.lock:
            if aid in self.running:  # delivered again (a reconnect restored it) while it runs here
                return
            self.running[aid] = _Running()
        try:
            self.beat()  # listed with the attempt before the coordinator can look
            add(self.r, stream, {"k": "claim", "w": self.name})
            got = self.r.blpop([channel.key("seal", aid, self.name)], timeout=SEAL_WAIT)
            if got is None or got[1] == b"refused":
                return
            bundle = json.loads(channel.unseal(self.private, got[1]))
            refused = self._admit(job, bundle)
            if refused is not None:
                log.warning("attempt %s refused: %s", str(aid)[:80], refused)
                self._end(stream, bundle, {"status": "failed", "exit_code": None, "message": f"{refused}; not run"})
                return
            result = self._execute(job, bundle, stream)
            self._end(stream, bundle, result)
        finally:
            with self.lock:
                self.running.pop(aid, None)

    def _admit(self, job: dict[str, Any], bundle: dict[str, Any]) -> str | None:
        """Why this attempt may not run here (None: it may, and it is now recorded as run)."""
        why = channel.check_grant(self.coordinator, bundle.get("grant"), job["aid"], self.name, channel.digest(job))
        if why is not None:
            return why
        expires = json.loads(bundle["grant"]["body"])["expires"]
        with self.lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            now, kept, seen = time.time(), [], False
            if self.ran.exists():
                for line in self.ran.read_text().splitlines():
                    parts = line.split()
                    if len(parts) == 2 and parts[1].isdigit() and int(parts[1]) >= now:  # expired: refused anyway
                        kept.append(line)
                        seen = seen or parts[0] == job["aid"]
            if seen:
                return f"attempt {job['aid']} already ran on this worker (a replay)"
            kept.append(f"{job['aid']} {expires}")
            tmp = self.ran.with_name("ran.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write("\n".join(kept) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.ran)
        return None

    def _end(self, stream: str, bundle: dict[str, Any], result: dict[str, Any]) -> None:
        """Send the signed result; while the broker is away, keep trying (the attempt stays listed)."""
        body = json.dumps(result)
        try:
            mac = channel.sign(bytes.fromhex(str(bundle.get("mac"))), body)
        except ValueError:
            mac = ""
        fields = {"k": "end", "b": body, "mac": mac}
        give_up = time.monotonic() + END_WAIT
        while True:
            try:
                add(self.r, stream, fields)
                return
            except redis.RedisError as exc:
                if time.monotonic() > give_up:
                    log.warning("attempt %s: its result could not be sent (%s); the coordinator runs it again",
                                stream, exc)
                    return
                time.sleep(1.0)

    def _execute(self, job: dict[str, Any], bundle: dict[str, Any], stream: str) -> dict[str, Any]:
        aid = job["aid"]
        secrets: dict[str, str] = bundle["env"]
        masker = Masker(list(bundle["mask"]))
        out = StreamLog(self.r, stream, masker, aid, bytes.fromhex(bundle["mac"]))
        deadline = time.time() + job["timeout"]
        result: dict[str, Any] = {"status": "failed", "exit_code": None, "message": None, "outputs": [],
                                  "values": {}}
        try:
            mirror = self._fetch(job)
            pool = git.WorktreePool(self.dir / "work", job["repo"], mirror, protected=bool(job.get("protected")))
            with pool.checkout(job["sha"]) as slot:
                for name, sha256 in job["inputs"]:
                    channel.unpack(self.r.get(channel.key("in", aid, name)), sha256, slot.tree, f'input "{name}"')
                out_file = slot.root / "output"
                box = Confine(key=f"w{aid}", home=slot.root / "home", tree=slot.tree, name=job["repo"],
                              output=out_file, readonly=(pool.objects,), network=job["network"])
                held = cache_mod.Held(slot.root / "overlay")
                uses: list[tuple[cache_mod.Plan, Any]] = []
                try:
                    self.sandbox.prepare(box)  # before a restore: HOME made fresh, the tree handed over
                    uses = self._restore(job, slot.tree, box.home, held, out)
                    box = replace(box, overlays=tuple(held.overlays), binds=tuple(held.mounts))
                    token = uuid.uuid4().hex
                    launch = self.sandbox.launch(executor.bash(job["script"]), {**job["env"], **secrets}, box,
                                                 prepared=True)
                    attempt = executor.start(launch, out, token)  # type: ignore[arg-type]
                    with self.lock:
                        self.running[aid].attempt = attempt
                        stop = self.running[aid].stop
                    if stop:
                        attempt.stop(ActionStatus(stop), "stopped by the coordinator")
                    outcome = executor.wait(attempt, deadline)
                    result.update(status=outcome.status.value, exit_code=outcome.exit_code, message=outcome.message)
                    if outcome.status is ActionStatus.SUCCEEDED:
                        result["outputs"] = self._upload(aid, job, slot.tree)
                        result["values"] = {masker.mask(k): masker.mask(v) for k, v in _read_outputs(out_file).items()}
                        self.sandbox.ended(box)  # no process of the attempt is left while its tree is saved
                        protected, with_secrets = bool(job.get("protected")), bool(job.get("secrets"))
                        uses = [(plan, self.caches.save(plan, use, int(job.get("run") or 0), protected, with_secrets,
                                                        held, out.line)) for plan, use in uses]
                finally:
                    result["caches"] = [cache_mod.use_fields(use) for _plan, use in uses]
                    self.caches.release(held)  # before the slot is free: its overlays go
                out_file.unlink(missing_ok=True)
        except (GitpipeError, OSError, subprocess.CalledProcessError, redis.RedisError) as exc:
            result.update(status="failed", message=masker.mask(f"on worker {self.name}: {exc}"))
        out.close()
        return result

    def _restore(self, job: dict[str, Any], tree: Path, home: Path, held: cache_mod.Held,
                 out: StreamLog) -> list[tuple[cache_mod.Plan, Any]]:
        """The job's caches restored from this worker's entries, as the build host restores its own."""
        specs = tuple(CacheSpec(tuple(c["key"]), tuple(c["paths"])) for c in job.get("cache", []))
        if not specs:
            return []
        plans = cache_mod.plans(specs, job["repo"], str(job.get("action")), tree, home)
        return [(plan, self.caches.restore(plan, bool(job.get("protected")), held, out.line)) for plan in plans]

    def _fetch(self, job: dict[str, Any]) -> Path:
        """A bare mirror of the repo here, holding the run's commit (fetched with git when missing)."""
        # Checked even though the job matched its sealed digest: a path or an option from the
        # broker must never become one here (`--upload-pack=CMD` runs CMD outside the sandbox).
        if not repos.NAME.fullmatch(str(job["repo"])) or not SHA.fullmatch(str(job["sha"])):
            raise GitpipeError(f"the job names repo {str(job['repo'])[:80]!r} and commit {str(job['sha'])[:80]!r}; "
                               "not a repository name and a commit id: not run")
        mirror = self.dir / "repos" / f"{job['repo']}.git"
        with self.lock:
            lock = self.fetch_locks.setdefault(job["repo"], threading.Lock())
        with lock:
            if not mirror.exists():
                subprocess.run(["git", "init", "--quiet", "--bare", str(mirror)], check=True, capture_output=True)
            have = subprocess.run(["git", "-C", str(mirror), "cat-file", "-e", job["sha"] + "^{commit}"],
                                  capture_output=True)
            if have.returncode != 0:
                fetched = subprocess.run(
                    ["git", "-C", str(mirror), "fetch", "--quiet", "--no-tags", "--", job["git_url"],
                     "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"],
                    capture_output=True, text=True, stdin=subprocess.DEVNULL)
                if fetched.returncode != 0:
                    raise GitpipeError(f"git fetch {job['git_url']} failed: {fetched.stderr.strip()[-300:]}")
        return mirror

    def _upload(self, aid: str, job: dict[str, Any], tree: Path) -> list[list[str]]:
        sent = []
        for name, patterns in job["outputs"]:
            files = artifacts.match(tree, name, tuple(patterns))
            data, sha256 = channel.pack(tree, files)
            self.r.set(channel.key("out", aid, name), data, ex=channel.KEEP)
            sent.append([name, sha256])
        return sent


def serve(broker: str, labels: list[str], slots: int, name: str | None, directory: Path,
          coordinator: str | None, cache_max_size: int | None = None) -> None:
    """Run the worker until SIGTERM (Celery's warm shutdown: running attempts finish)."""
    name = name or socket.gethostname()
    if slots < 1:
        raise UsageError(f"--slots must be at least 1, not {slots}")
    bad = [label for label in labels if not LABEL.fullmatch(label)]
    if bad:
        raise UsageError(f'label "{bad[0]}" may hold only letters, digits, ".", "_" and "-"',
                         hint="write the labels as --labels linux,arm64")
    channel.queues_for(labels)  # too many labels: said now
    if not coordinator:
        raise UsageError("no build host key given: this worker would run jobs anyone with the broker password queues",
                         hint="pass --coordinator-key KEY or set GITPIPE_COORDINATOR_KEY to what "
                              "`gitpipe workers --coordinator-key` prints on the build host")
    channel.coordinator_key(coordinator)  # not a key: said now
    host = WorkerHost(broker, labels, slots, name, directory, coordinator, cache_max_size)
    try:
        host.beat()
    except redis.RedisError as exc:
        raise UsageError(f"the broker {redact(broker)} cannot be reached: {exc}",
                         hint="is redis-server running there, and are the URL and password right?") from None
    app = make_app(broker)
    app.task(name=channel.TASK)(host.run)
    log.warning("gitpipe worker %s: labels %s, %d slot(s); public key (for [cluster.workers] on the build host):"
                "\n%s = \"%s\"", name, ",".join(host.labels) or "(none)", slots, name,
                channel.public_text(host.private))
    for note in host.sandbox.notes:
        log.warning("%s", note)
    beat = threading.Thread(target=host.beat_forever, name="heartbeat", daemon=True)
    beat.start()
    try:
        app.worker_main(["worker", "--pool", "threads", "--concurrency", str(slots),
                         "--hostname", f"{name}@{socket.gethostname()}",
                         "--queues", ",".join(channel.queues_for(host.labels)),
                         "--without-gossip", "--without-mingle", "--loglevel", "WARNING"])
    finally:
        host.stopping.set()
        try:
            host.r.delete(channel.key("worker", name))
        except redis.RedisError:
            pass
        host.sandbox.close()

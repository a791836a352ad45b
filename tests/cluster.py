"""Helpers of the cluster tests: a private redis-server and real `gitpipe worker` processes."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import GITPIPE, Home, base_env, wait_for


def free_port() -> int:
    """A free port below the kernel's ephemeral range: a redis-server restarted on its port (a
    test stops it mid-run) must not find it taken by a port another test asked the kernel for."""
    import random

    while True:
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


@dataclass
class Redis:
    """A redis-server of this test alone: 127.0.0.1, a free port, its own dir and password."""

    dir: Path
    port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: secrets.token_hex(12))
    proc: subprocess.Popen[bytes] | None = None
    tls: bool = False  # TLS only (rediss://), with a CA of its own

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://:{self.password}@127.0.0.1:{self.port}/0?ssl_ca_certs={self.dir / 'ca.pem'}"
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - the server holds it
        port = ["--port", str(self.port)]
        if self.tls:
            if not (self.dir / "server.pem").exists():
                make_certificates(self.dir)
            port = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.dir / "server.pem"),
                    "--tls-key-file", str(self.dir / "server.key"), "--tls-ca-cert-file", str(self.dir / "ca.pem"),
                    "--tls-auth-clients", "no"]
        self.proc = subprocess.Popen(
            ["redis-server", *port, "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--save", "", "--appendonly", "yes", "--requirepass", self.password, "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(lambda: self.cli("PING").strip() == "PONG", timeout=20, what="redis-server to answer")

    def stop(self) -> None:
        """SIGTERM (it writes its append-only file and exits), as `systemctl stop redis` does."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cli(self, *args: str) -> str:
        tls = ["--tls", "--cacert", str(self.dir / "ca.pem")] if self.tls else []
        proc = subprocess.run(["redis-cli", *tls, "-h", "127.0.0.1", "-p", str(self.port), "--no-auth-warning",
                               "-a", self.password, *args], capture_output=True, text=True, timeout=30)
        return proc.stdout

    def everything(self) -> bytes:
        """Every key (`redis-cli --scan`) and every value in it, as bytes."""
        import redis as redis_py

        r = redis_py.Redis.from_url(self.url.split("?")[0], ssl_ca_certs=str(self.dir / "ca.pem")) if self.tls \
            else redis_py.Redis(host="127.0.0.1", port=self.port, password=self.password)
        out = []
        for name in self.cli("--scan").split():
            out.append(name.encode())
            kind = r.type(name).decode()
            if kind == "string":
                out.append(r.get(name) or b"")
            elif kind == "list":
                out.extend(r.lrange(name, 0, -1))
            elif kind == "stream":
                for _, fields in r.xrange(name):
                    out.extend(k + b"=" + v for k, v in fields.items())
            elif kind == "hash":
                out.extend(k + b"=" + v for k, v in r.hgetall(name).items())
            elif kind == "set":
                out.extend(r.smembers(name))
            elif kind == "zset":
                out.extend(r.zrange(name, 0, -1))
        r.close()
        return b"\n".join(out)


def make_certificates(d: Path) -> None:
    """A CA and a certificate for 127.0.0.1 signed by it (openssl)."""
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=gitpipe test CA")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "san.ext")


def need_redis() -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is missing: apt-get install -y redis-server")
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")


@dataclass
class Worker:
    name: str
    labels: str
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    args: tuple[str, ...] = ()  # more `gitpipe worker` options

    def log(self) -> str:
        return (self.dir / "worker.log").read_text(errors="replace")


class Cluster:
    """A redis-server, the coordinator's [cluster] table, and `gitpipe worker` processes."""

    def __init__(self, home: Home, root: Path, share: Path | None = None) -> None:
        self.home, self.root, self.share = home, root, share
        self.redis = Redis(root / "redis")
        self.workers: dict[str, Worker] = {}

    def add(self, name: str, labels: str, *args: str) -> Worker:
        """A worker's dir, key and sandbox settings; trusted by the coordinator (call before configure)."""
        from gitpipe.cluster import channel

        d = self.root / "workers" / name
        d.mkdir(parents=True)
        if self.share is not None:
            (d / "gitpipe.toml").write_text(f'[sandbox]\nread_write = ["{self.share}"]\n')
        self.workers[name] = Worker(name, labels, d, args=args)
        channel.load_private(d / "worker.key")
        return self.workers[name]

    def configure(self, local: bool = True) -> None:
        from gitpipe.cluster import channel

        keys = "\n".join(f'{w.name} = "{channel.public_text(channel.load_private(w.dir / "worker.key"))}"'
                         for w in self.workers.values())
        self.home.configure(f'[cluster]\nbroker = "{self.redis.url}"\nlocal = {str(local).lower()}\n'
                            f"[cluster.workers]\n{keys}\n")

    def start(self, name: str) -> Worker:
        w = self.workers[name]
        log = open(w.dir / "worker.log", "ab")  # noqa: SIM115 - the worker holds it
        w.proc = subprocess.Popen(
            [GITPIPE, "worker", "--broker", self.redis.url, "--labels", w.labels, "--name", name,
             "--dir", str(w.dir), "--slots", "1", "--home", str(self.home.home), *w.args],
            env={**base_env(), "GITPIPE_COORDINATOR_KEY": self.coordinator_key()}, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        wait_for(lambda: name in self.live(), timeout=60, what=f"worker {name} to beat")
        return w

    def coordinator_key(self) -> str:
        """The build host's public key, as the admin copies it to each worker."""
        proc = self.home.gitpipe("workers", "--coordinator-key")
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    def live(self) -> dict[str, dict]:
        proc = self.home.gitpipe("workers", "--json", "--broker", self.redis.url)
        assert proc.returncode == 0, proc.stderr
        return {w["name"]: w for w in json.loads(proc.stdout)}

    def kill(self, name: str) -> None:
        """kill -9 the worker (and what it started: its session)."""
        w = self.workers[name]
        assert w.proc is not None
        os.killpg(w.proc.pid, signal.SIGKILL)
        w.proc.wait()

    def stop_all(self) -> None:
        for w in self.workers.values():
            if w.proc is not None and w.proc.poll() is None:
                os.killpg(w.proc.pid, signal.SIGTERM)
        end = time.monotonic() + 20
        for w in self.workers.values():
            if w.proc is not None:
                try:
                    w.proc.wait(max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(w.proc.pid, signal.SIGKILL)
                    w.proc.wait()


@contextmanager
def cluster(home: Home, root: Path, workers: dict[str, str], share: Path | None = None,
            local: bool = True, tls: bool = False, args: tuple[str, ...] = ()) -> Iterator[Cluster]:
    need_redis()
    c = Cluster(home, root, share)
    c.redis.tls = tls
    c.redis.start()
    try:
        for name, labels in workers.items():
            c.add(name, labels, *args)
        c.configure(local)
        for name in workers:
            c.start(name)
        yield c
    finally:
        c.stop_all()
        c.redis.stop()

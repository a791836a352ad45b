"""What crosses the broker between the coordinator and a worker, and how it is protected.

Redis holds, per attempt `aid` (action id, number and a random part, never reused):
- `gitpipe:log:<aid>` a stream: the worker's `claim`, its masked output (`out`, each chunk
  numbered and MACed with the attempt's result key), its signed result (`end`); the coordinator reads it as it grows (`logs --follow`).
- `gitpipe:seal:<aid>` a list with one entry: the attempt's secrets and result key,
  sealed to the public key of the worker that claimed it (X25519, HKDF-SHA256, AES-GCM),
  with a grant the coordinator signed with its Ed25519 key (attempt id, worker name, job
  digest, expiry): a worker runs only what the coordinator granted it, once.
- `gitpipe:stop:<aid>` set when the attempt is to stop (cancel, timeout, daemon stop).
- `gitpipe:in:<aid>:<name>`, `gitpipe:out:<aid>:<name>`: artifacts as tar files, each
  with its sha256 checked at the other end.
- `gitpipe:worker:<name>`: a worker's heartbeat (labels, slots, running attempts),
  expiring HEARTBEAT_TTL seconds after its last beat: a killed or cut-off worker vanishes.
Nothing secret is ever stored in clear: logs and outputs are masked by the worker before
they are sent, the secrets themselves travel sealed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import ssl
import tarfile
import time
from collections.abc import Iterable
from itertools import combinations
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gitpipe.errors import ActionError, UsageError

PREFIX = "gitpipe:"
HEARTBEAT_EVERY = 2.0  # seconds between a worker's beats
HEARTBEAT_TTL = 15  # seconds: a worker without a beat that long is gone (its attempts are interrupted)
KEEP = 3600  # seconds an attempt's keys outlive it at most (a coordinator that never came back)
GRANT_TTL = 300  # seconds a signed grant is good for once sealed (the worker unseals it at once)
MAX_LABELS = 8  # a worker listens on one queue per subset of its labels: 2**8 at most
TASK = "gitpipe.attempt"


Client = Any  # a redis.Redis returning bytes; redis-py's own types also allow str (decode_responses)


TLS_PARAMS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def tls(url: str) -> tuple[str, dict[str, Any]]:
    """The URL without its TLS query parameters, and those as options (rediss:// only).

    `rediss://HOST:6380/0?ssl_ca_certs=/etc/gitpipe/ca.pem` checks the server's certificate
    against that CA; with no parameter the system's CAs are used and a certificate is required.
    """
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return url, {}
    query = parse_qsl(parts.query)
    options: dict[str, Any] = {k: v for k, v in query if k in TLS_PARAMS}
    reqs = str(options.get("ssl_cert_reqs", "required")).lower().replace("cert_", "")
    options["ssl_cert_reqs"] = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL,
                                "none": ssl.CERT_NONE}.get(reqs, ssl.CERT_REQUIRED)
    rest = urlencode([(k, v) for k, v in query if k not in TLS_PARAMS])
    return urlunsplit(parts._replace(query=rest)), options


def connect(url: str) -> Client:
    """A client of the broker (redis:// or rediss://, a password in the URL)."""
    plain, options = tls(url)
    return redis.Redis.from_url(plain, socket_timeout=10, socket_connect_timeout=5, health_check_interval=10,
                                **options)


def redact(url: str) -> str:
    """The broker URL without its password, for messages."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, _, _ = head.partition("://")
    return f"{scheme}://***@{tail}"


def key(kind: str, *parts: str) -> str:
    return PREFIX + ":".join((kind, *parts))


def queue_of(labels: Iterable[str]) -> str:
    """The Celery queue of an action with these labels (none: any worker's)."""
    names = sorted(set(labels))
    return "gitpipe" if not names else "gitpipe." + "+".join(names)


def queues_for(labels: Iterable[str]) -> list[str]:
    """Every queue a worker with these labels takes from: one per subset of them."""
    names = sorted(set(labels))
    if len(names) > MAX_LABELS:
        raise UsageError(f"a worker may have at most {MAX_LABELS} labels, not {len(names)}",
                         hint="keep the labels that pipelines ask for in runs_on")
    return [queue_of(subset) for n in range(len(names) + 1) for subset in combinations(names, n)]


# ---------------------------------------------------------------------------- keys and sealing
def _make_key(path: Path, raw: bytes) -> None:
    """Write a new private key, mode 0600 (never over an existing one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # whole or not at all; a key another process made first is kept
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def _raw(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def load_private(path: Path) -> X25519PrivateKey:
    """The worker's private key, made (mode 0600) on first use."""
    if not path.exists():
        _make_key(path, _raw(X25519PrivateKey.generate()))
    return X25519PrivateKey.from_private_bytes(path.read_bytes())


def load_signing(path: Path) -> Ed25519PrivateKey:
    """The coordinator's Ed25519 signing key, made (mode 0600) on first use."""
    if not path.exists():
        _make_key(path, _raw(Ed25519PrivateKey.generate()))
    return Ed25519PrivateKey.from_private_bytes(path.read_bytes())


def signing_text(private: Ed25519PrivateKey) -> str:
    """The coordinator's public key as workers take it (--coordinator-key)."""
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def coordinator_key(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise UsageError(f"--coordinator-key {text.strip()[:60]!r} is not the build host's public key: {exc}",
                         hint="copy the key `gitpipe workers --coordinator-key` prints on the build host") from None


def grant(key: Ed25519PrivateKey, aid: str, worker: str, job_digest: str) -> dict[str, str]:
    """What the coordinator signs for one attempt on one worker: it expires GRANT_TTL seconds on."""
    body = json.dumps({"aid": aid, "worker": worker, "digest": job_digest,
                       "expires": int(time.time()) + GRANT_TTL}, sort_keys=True)
    return {"body": body, "sig": base64.b64encode(key.sign(b"gitpipe-grant-v1\n" + body.encode())).decode()}


def check_grant(key: Ed25519PublicKey, given: Any, aid: str, worker: str, job_digest: str) -> str | None:
    """Why this grant does not allow running `aid` here (None: it does)."""
    if not isinstance(given, dict) or not isinstance(given.get("body"), str) or not isinstance(given.get("sig"), str):
        return "the attempt carries no grant signed by the build host"
    try:
        key.verify(base64.b64decode(given["sig"]), b"gitpipe-grant-v1\n" + given["body"].encode())
    except (InvalidSignature, ValueError):
        return "the attempt's grant is not signed by the build host's key (--coordinator-key)"
    body = json.loads(given["body"])
    if body.get("aid") != aid or body.get("worker") != worker:
        return f"the grant is for attempt {body.get('aid')} on worker {body.get('worker')}, not {aid} on {worker}"
    if body.get("digest") != job_digest:
        return "the job on the broker does not match the one the build host signed"
    if not isinstance(body.get("expires"), int) or body["expires"] < time.time():
        return "the grant has expired (a replay, or this host's clock is off)"
    return None


def public_text(private: X25519PrivateKey) -> str:
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def _derive(shared: bytes, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"gitpipe-seal-v1").derive(shared)


def seal(public: str, data: bytes) -> bytes:
    """Encrypt `data` so that only the holder of `public`'s private key reads it."""
    try:
        peer = X25519PublicKey.from_public_bytes(base64.b64decode(public))
    except ValueError as exc:
        raise UsageError(f"not a worker public key: {exc}", hint="copy the key `gitpipe worker` prints") from None
    eph = X25519PrivateKey.generate()
    eph_pub = eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    nonce = os.urandom(12)
    box = AESGCM(_derive(eph.exchange(peer), eph_pub + base64.b64decode(public)))
    return eph_pub + nonce + box.encrypt(nonce, data, None)


def unseal(private: X25519PrivateKey, blob: bytes) -> bytes:
    eph_pub, nonce, body = blob[:32], blob[32:44], blob[44:]
    mine = base64.b64decode(public_text(private))
    box = AESGCM(_derive(private.exchange(X25519PublicKey.from_public_bytes(eph_pub)), eph_pub + mine))
    return box.decrypt(nonce, body, None)


def sign(secret: bytes, body: str) -> str:
    return hmac.new(secret, body.encode(), hashlib.sha256).hexdigest()


def verify(secret: bytes, body: str, mac: str) -> bool:
    return hmac.compare_digest(sign(secret, body), mac)


def chunk_mac(secret: bytes, aid: str, n: int, data: bytes) -> str:
    """The MAC of the n-th log chunk of an attempt: a chunk is neither forged nor replayed elsewhere."""
    return hmac.new(secret, f"{aid}:{n}:".encode() + data, hashlib.sha256).hexdigest()


def verify_chunk(secret: bytes, aid: str, n: int, data: bytes, mac: str) -> bool:
    return hmac.compare_digest(chunk_mac(secret, aid, n, data), mac)


def digest(job: dict[str, Any]) -> str:
    """The sha256 of a job as sent: sealed with the secrets, so the worker knows the job is untouched."""
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------- artifacts
def pack(root: Path, files: Iterable[str]) -> tuple[bytes, str]:
    """A tar of `files` (relative to `root`), and its sha256."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel in files:
            tar.add(root / rel, arcname=rel, recursive=False)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def unpack(data: bytes | None, sha256: str, dest: Path, what: str) -> None:
    """Check `data` against the sha256 the sender gave, then extract it (regular files only) into `dest`."""
    if data is None:
        raise ActionError(f"{what}: not found on the broker (expired, or the broker restarted)")
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise ActionError(f"{what}: sha256 {got} does not match {sha256} sent with it; not used")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(dest, filter="data")


def tree_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "MANIFEST.sha256")

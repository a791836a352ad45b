"""Host configuration: where the home is, what gitpipe.toml says, every default in one place.

Standard library only: the git hooks load settings too.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gitpipe.durations import parse_duration
from gitpipe.errors import ConfigError, UsageError
from gitpipe.tomllines import Problems

CONFIG_NAME = "gitpipe.toml"

# Every setting's default, in one place. `None` means "derived at load time" (see _derive).
DEFAULTS: dict[str, Any] = {
    "max_parallel": None,  # CPU count
    "site_dir": "site",  # relative to the home
    "site_url": "",
    "keep_runs": 500,
    "stop_grace": "30s",
    "max_log_size": "64M",
    "max_artifact_size": "2G",
    "publish_artifacts": "protected",
    "control_socket": "/run/gitpipe/gitpipe.sock",
}
PUBLISH_CHOICES = ("protected", "all", "none")
SSH_DEFAULTS: dict[str, Any] = {"known_hosts": "known_hosts", "identity": ""}
NOTIFY_DEFAULTS: dict[str, Any] = {"on": [], "webhook": "", "command": ""}
REPO_DEFAULTS: dict[str, Any] = {"protected": None, "reject_invalid": False}
SANDBOX_DEFAULTS: dict[str, Any] = {
    "mode": "bwrap", "user": "gitpipe-build", "network": True, "memory": "4G", "pids": 2048,
    "read_only": [], "read_write": [],
}
SANDBOX_MODES = ("bwrap", "none")
CACHE_DEFAULTS: dict[str, Any] = {"max_size": "20G"}
CLUSTER_DEFAULTS: dict[str, Any] = {"broker": "", "local": True, "git_url": "{path}", "workers": {}}
_SIZE = re.compile(r"^(\d+)\s*([KMGT]?)i?B?$", re.IGNORECASE)

COMMENTS: dict[str, str] = {
    "max_parallel": "actions running at once on this host (default: the number of CPUs)",
    "site_dir": "where the static report site is written (relative to the home, or absolute)",
    "site_url": "the URL the site is served at; printed to pushers with each run (empty: not printed)",
    "keep_runs": "runs whose logs, artifacts and worktrees are kept; older runs keep only their summary",
    "stop_grace": "how long running actions may go on after the daemon is asked to stop",
    "max_log_size": "an attempt's output is cut past this size (timestamps not counted), with a line saying so",
    "max_artifact_size": "an action whose outputs add up to more than this fails, naming this limit",
    "publish_artifacts": 'artifacts linked from the report site: "protected" (runs of protected refs), "all", "none"',
    "control_socket": "where the daemon listens for approve/reject by accounts that cannot open this home "
                      '(absolute; "" = nowhere); `approvers` in a pipeline names who may',
}


@dataclass(frozen=True)
class RepoSettings:
    """Per-repo host settings from `[repos.NAME]` (trust is decided here, never by a pushed file)."""

    protected: tuple[str, ...] | None = None  # None: default branch + every tag
    reject_invalid: bool = False


@dataclass(frozen=True)
class SandboxSettings:
    """`[sandbox]`: how every action attempt is confined (SPEC section 11)."""

    mode: str = "bwrap"  # "bwrap", or "none" when written out
    user: str = "gitpipe-build"  # the account actions run as when the daemon is root
    network: bool = True  # a pipeline or an action may only turn it off
    memory: int | None = 4 << 30  # bytes per attempt
    pids: int | None = 2048  # processes per attempt
    read_only: tuple[Path, ...] = ()  # host paths every action sees read-only (toolchains)
    read_write: tuple[Path, ...] = ()  # host paths every action may write (a shared spool)


@dataclass(frozen=True)
class ClusterSettings:
    """`[cluster]`: actions on worker hosts through Celery on a Redis broker (SPEC section 13)."""

    broker: str  # redis:// or rediss:// URL, may carry a password
    local: bool = True  # actions no label sends elsewhere run here
    git_url: str = "{path}"  # where workers fetch a repo: {path} and {repo} are filled in
    workers: tuple[tuple[str, str], ...] = ()  # (name, public key): the workers trusted with secrets


@dataclass(frozen=True)
class Settings:
    home: Path
    max_parallel: int
    site_dir: Path
    site_url: str
    keep_runs: int
    stop_grace: float
    known_hosts: Path
    identity: Path | None
    notify_on: tuple[str, ...] = ()
    notify_webhook: str = ""
    notify_command: str = ""
    repos: dict[str, RepoSettings] = field(default_factory=dict)
    max_log_size: int = 64 << 20  # bytes per attempt
    max_artifact_size: int = 2 << 30  # bytes per action's outputs
    publish_artifacts: str = "protected"
    sandbox: SandboxSettings = field(default_factory=SandboxSettings)
    control_socket: Path | None = Path(DEFAULTS["control_socket"])
    cache_max_size: int = 20 << 30  # [cache] max_size: bytes of build caches kept (LRU beyond)
    cluster: ClusterSettings | None = None  # None: one host, nothing of gitpipe.cluster is imported

    # Paths of the home, computed from the home (never at import time).
    @property
    def db_path(self) -> Path:
        return self.home / "gitpipe.db"

    @property
    def config_path(self) -> Path:
        return self.home / CONFIG_NAME

    @property
    def secrets_path(self) -> Path:
        return self.home / "secrets.toml"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "artifacts"

    @property
    def work_dir(self) -> Path:
        return self.home / "work"

    @property
    def cache_dir(self) -> Path:
        return self.home / "build-cache"

    @property
    def wake_dir(self) -> Path:
        return self.home / "wake"

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    def repo(self, name: str) -> RepoSettings:
        return self.repos.get(name, RepoSettings())


def default_home(environ: dict[str, str] | None = None) -> Path:
    """The home when no --home is given: $GITPIPE_HOME, the systemd state dir, or ~/.local/share."""
    env = os.environ if environ is None else environ
    if env.get("GITPIPE_HOME"):
        return Path(env["GITPIPE_HOME"])
    if os.geteuid() == 0 and env.get("INVOCATION_ID"):
        return Path("/var/lib/gitpipe")
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "gitpipe"


def resolve_home(home: str | Path | None) -> Path:
    return Path(home).expanduser().absolute() if home else default_home().absolute()


def load(home: str | Path | None, *, must_exist: bool = True) -> Settings:
    """Read `<home>/gitpipe.toml` (missing file = all defaults) into a Settings."""
    root = resolve_home(home)
    if must_exist and root.exists() and not root.is_dir():
        raise UsageError(f"gitpipe home {root} is a file, not a directory", hint="pass --home DIR")
    if must_exist and not root.is_dir():
        raise UsageError(
            f"gitpipe home {root} does not exist", hint="run `gitpipe init` first, or pass --home DIR"
        )
    path = root / CONFIG_NAME
    data: dict[str, Any] = {}
    text = ""
    if path.exists():
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:  # the daemon, the CLI and the hooks all come through here
            raise ConfigError(f"not UTF-8 text (byte 0x{raw[exc.start]:02x}); TOML files must be UTF-8",
                              file=str(path), line=raw.count(b"\n", 0, exc.start) + 1,
                              hint="save the file as UTF-8") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"not valid TOML: {exc}", file=str(path), line=_err_line(str(exc))) from None
    return _build(root, data, Problems(str(path), text))


def _err_line(message: str) -> int | None:
    m = re.search(r"line (\d+)", message)
    return int(m.group(1)) if m else None


def _unknown(p: Problems, data: dict[str, Any], known: dict[str, Any], table: tuple[str, ...]) -> None:
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f'did you mean "{close[0]}"?' if close else f"known keys: {', '.join(sorted(known))}"
            where = f"[{'.'.join(table)}] " if table else ""
            p.add(f'{where}unknown key "{key}"', *table, key, hint=hint)


def _typed(p: Problems, data: dict[str, Any], key: str, kind: type | tuple[type, ...],
           table: tuple[str, ...], default: Any = None) -> Any:
    """`data[key]` if it has the type `kind`; else the problem is reported and `default` returned."""
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        p.add(f'"{key}" must be a {names}, not {value!r}', *table, key)
        return default
    return value


def _build(home: Path, data: dict[str, Any], p: Problems) -> Settings:
    """Settings from the parsed gitpipe.toml; every problem is reported at once (ConfigError)."""
    top = {**DEFAULTS, "ssh": {}, "notify": {}, "repos": {}, "sandbox": {}, "cache": {}, "cluster": {}}
    _unknown(p, data, top, ())
    merged = {**DEFAULTS, **{k: v for k, v in data.items() if k in DEFAULTS}}
    for key in ("max_parallel", "keep_runs"):
        if data.get(key) is not None:
            merged[key] = _typed(p, data, key, int, (), DEFAULTS[key])
            if merged[key] is not None and merged[key] < 1:
                p.add(f'"{key}" must be at least 1', key)
                merged[key] = DEFAULTS[key]
    for key in ("site_dir", "site_url", "stop_grace", "max_log_size", "max_artifact_size", "publish_artifacts",
                "control_socket"):
        if key in data:
            merged[key] = _typed(p, data, key, str, (), DEFAULTS[key])
    sizes = {key: _size(p, merged[key], DEFAULTS[key], f'"{key}"', key)
             for key in ("max_log_size", "max_artifact_size")}
    if merged["publish_artifacts"] not in PUBLISH_CHOICES:
        p.add(f'"publish_artifacts" must be "protected", "all" or "none", not "{merged["publish_artifacts"]}"',
              "publish_artifacts")
        merged["publish_artifacts"] = DEFAULTS["publish_artifacts"]
    try:
        grace = parse_duration(merged["stop_grace"])
    except ValueError as exc:
        p.add(str(exc), "stop_grace")
        grace = parse_duration(DEFAULTS["stop_grace"])
    ssh = {**SSH_DEFAULTS, **_table(p, data, "ssh", SSH_DEFAULTS)}
    notify = {**NOTIFY_DEFAULTS, **_table(p, data, "notify", NOTIFY_DEFAULTS)}
    for table, values, defaults in (("ssh", ssh, SSH_DEFAULTS), ("notify", notify, NOTIFY_DEFAULTS)):
        for key in values:
            values[key] = _typed(p, values, key, list if key == "on" else str, (table,), defaults[key])
    if not all(isinstance(event, str) for event in notify["on"]):
        p.add('"on" must be a list of event names, e.g. ["failed"]', "notify", "on")
        notify["on"] = []
    repos = {name: _repo(p, name, value) for name, value in _table(p, data, "repos", None).items()}
    identity = str(ssh["identity"])
    control = str(merged["control_socket"])
    if control and (not control.startswith("/") or Path(control).is_relative_to(home)):
        p.add(f'"control_socket" must be an absolute path outside the home, not "{control}"',
              "control_socket", hint="accounts that approve cannot enter the home (mode 0700); "
              '"" turns the socket off')
        control = ""
    sandbox = _sandbox(p, _table(p, data, "sandbox", SANDBOX_DEFAULTS), home)
    for path in sandbox.read_only + sandbox.read_write:
        if control and Path(control).is_relative_to(path):
            p.add(f"[sandbox] {path} would show actions the control socket {control}", "control_socket",
                  hint="an action must never reach the socket that decides approvals")
    cache = {**CACHE_DEFAULTS, **_table(p, data, "cache", CACHE_DEFAULTS)}
    cache_size = _size(p, _typed(p, cache, "max_size", str, ("cache",), CACHE_DEFAULTS["max_size"]),
                       CACHE_DEFAULTS["max_size"], '[cache] "max_size"', "cache", "max_size")
    cluster = _cluster(p, _table(p, data, "cluster", CLUSTER_DEFAULTS)) if "cluster" in data else None
    p.check()
    return Settings(
        home=home,
        max_parallel=merged["max_parallel"] or os.cpu_count() or 2,
        site_dir=home / str(merged["site_dir"]),
        site_url=str(merged["site_url"]).rstrip("/"),
        keep_runs=merged["keep_runs"],
        stop_grace=grace,
        known_hosts=home / str(ssh["known_hosts"]),
        identity=(home / identity) if identity else None,
        notify_on=tuple(notify["on"]),
        notify_webhook=str(notify["webhook"]),
        notify_command=str(notify["command"]),
        repos=repos,
        max_log_size=sizes["max_log_size"],
        max_artifact_size=sizes["max_artifact_size"],
        publish_artifacts=merged["publish_artifacts"],
        sandbox=sandbox,
        control_socket=Path(control) if control else None,
        cache_max_size=cache_size,
        cluster=cluster,
    )


def _size(p: Problems, value: str, default: str, name: str, *path: str) -> int:
    """Bytes of a size setting; a bad one is reported (as `name`: why) and `default` is used."""
    try:
        return parse_size(value)
    except ValueError as exc:
        p.add(f"{name}: {exc}", *path)
        return parse_size(default)


def parse_size(value: str) -> int:
    """Bytes in a size such as "4G", "512M", "1T" (powers of 1024) or "1000000"."""
    match = _SIZE.match(value.strip())
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f'bad size "{value}": write a number with a unit K, M, G or T, e.g. "4G" or "512M"')
    return int(match.group(1)) << (10 * " KMGT".index(match.group(2).upper() or " "))


def format_size(n: int) -> str:
    """4294967296 -> "4G": a size as gitpipe.toml writes it (the inverse of `parse_size`)."""
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n} bytes"


def _sandbox(p: Problems, value: dict[str, Any], home: Path) -> SandboxSettings:
    merged = {**SANDBOX_DEFAULTS, **value}
    at = ("sandbox",)
    for key in ("mode", "user"):
        merged[key] = _typed(p, merged, key, str, at, SANDBOX_DEFAULTS[key])
    merged["network"] = _typed(p, merged, "network", bool, at, SANDBOX_DEFAULTS["network"])
    if merged["mode"] not in SANDBOX_MODES:
        p.add(f'"mode" must be "bwrap" or "none", not "{merged["mode"]}"', *at, "mode",
              hint='"bwrap" confines every action (install the Debian package bubblewrap)')
        merged["mode"] = SANDBOX_DEFAULTS["mode"]
    memory = _size(p, _typed(p, merged, "memory", str, at, SANDBOX_DEFAULTS["memory"]), SANDBOX_DEFAULTS["memory"],
                   '[sandbox] "memory"', *at, "memory")
    pids = _typed(p, merged, "pids", int, at, SANDBOX_DEFAULTS["pids"])
    if pids < 16:
        p.add('"pids" must be at least 16 (bash, git and a build need a few)', *at, "pids")
        pids = SANDBOX_DEFAULTS["pids"]
    binds = {}
    for key in ("read_only", "read_write"):
        paths = _typed(p, merged, key, list, at, [])
        if not all(isinstance(path, str) and path.startswith("/") for path in paths):
            p.add(f'"{key}" must be a list of absolute paths, e.g. ["/opt/toolchains"]', *at, key)
            paths = []
        for path in paths:
            if Path(path) == Path("/") or home.is_relative_to(path) or Path(path).is_relative_to(home):
                p.add(f'"{key}": {path} would show actions the gitpipe home {home}', *at, key,
                      hint="name paths outside the home; the home is the daemon's alone")
        binds[key] = tuple(Path(path) for path in paths)
    return SandboxSettings(mode=merged["mode"], user=merged["user"], network=merged["network"],
                           memory=memory, pids=pids, **binds)


def _cluster(p: Problems, value: dict[str, Any]) -> ClusterSettings | None:
    merged = {**CLUSTER_DEFAULTS, **value}
    at = ("cluster",)
    for key in ("broker", "git_url"):
        merged[key] = _typed(p, merged, key, str, at, CLUSTER_DEFAULTS[key])
    merged["local"] = _typed(p, merged, "local", bool, at, CLUSTER_DEFAULTS["local"])
    workers = merged["workers"]
    if not re.match(r"^rediss?://", merged["broker"]):
        p.add('"broker" must be a redis:// or rediss:// URL, e.g. "redis://:PASSWORD@10.0.0.5:6379/0"',
              *at, *(("broker",) if "broker" in value else ()))
        return None
    if not isinstance(workers, dict) or not all(isinstance(v, str) for v in workers.values()):
        p.add('"workers" must be a table of NAME = "public key" (what `gitpipe worker` prints)', *at, "workers")
        return None
    return ClusterSettings(broker=merged["broker"], local=merged["local"], git_url=merged["git_url"],
                           workers=tuple(sorted(workers.items())))


def _table(p: Problems, data: dict[str, Any], name: str, known: dict[str, Any] | None) -> dict[str, Any]:
    """The table `name` of gitpipe.toml; only its known keys (the others are reported)."""
    value = data.get(name, {})
    if not isinstance(value, dict):
        p.add(f'"{name}" must be a table ([{name}])', name)
        return {}
    if known is None:
        return value
    _unknown(p, value, known, (name,))
    return {k: v for k, v in value.items() if k in known}


def _repo(p: Problems, name: str, value: Any) -> RepoSettings:
    at = ("repos", name)
    if not isinstance(value, dict):
        p.add(f'"repos.{name}" must be a table', *at)
        return RepoSettings()
    _unknown(p, value, REPO_DEFAULTS, at)
    protected = value.get("protected")
    if protected is not None and (
        not isinstance(protected, list) or not all(isinstance(x, str) for x in protected)
    ):
        p.add('"protected" must be a list of ref globs, e.g. ["main", "v*"]', *at, "protected")
        protected = None
    reject = value.get("reject_invalid", False)
    if not isinstance(reject, bool):
        p.add('"reject_invalid" must be true or false', *at, "reject_invalid")
        reject = False
    return RepoSettings(protected=tuple(protected) if protected is not None else None, reject_invalid=reject)


def default_config_text() -> str:
    """The commented gitpipe.toml that `gitpipe init` writes (values through tomli-w)."""
    import tomli_w  # only `gitpipe init` needs it

    out = ["# gitpipe host configuration. Unknown keys are an error.", ""]
    for key, comment in COMMENTS.items():
        value = DEFAULTS[key]
        out.append(f"# {comment}")
        if value is None:
            out.append(f"# {key} = {os.cpu_count() or 2}")
        else:
            out.append(tomli_w.dumps({key: value}).strip())
        out.append("")
    out += [
        "[ssh]",
        "# host keys of deploy targets; an unknown or changed key fails the deploy",
        tomli_w.dumps({"known_hosts": SSH_DEFAULTS["known_hosts"]}).strip(),
        "# private key for deploys (empty: the daemon user's own keys and agent)",
        tomli_w.dumps({"identity": SSH_DEFAULTS["identity"]}).strip(),
        "",
        "[notify]",
        "# defaults for every pipeline: events (succeeded, failed, cancelled, approval, deployed,",
        "# rolled-back), and a webhook URL and/or a command that gets the event JSON on stdin",
        tomli_w.dumps({"on": ["failed"], "webhook": "", "command": ""}).strip(),
        "",
        "# How actions are confined (these are the defaults):",
        "# [sandbox]",
        '# mode = "bwrap"          # every attempt in bubblewrap (Debian package bubblewrap): its own',
        "#                         # worktree, the system read-only, no gitpipe home, no repos, no other",
        '#                         # process; "none" turns that off (never allowed for a root daemon)',
        '# user = "gitpipe-build"  # the account actions run as when the daemon is root (made by init)',
        "# network = true          # a pipeline or an action may turn it off with network = false",
        '# memory = "4G"           # per attempt, enforced by a cgroup where the host allows one',
        "# pids = 2048             # processes per attempt",
        '# read_only = []          # host paths every action sees read-only, e.g. ["/opt/toolchains"]',
        "# read_write = []         # host paths every action may write (shared by every branch!)",
        "",
        "# Build caches (`cache = [...]` on an action; see the README):",
        "# [cache]",
        '# max_size = "20G"        # least recently used entries are removed beyond this',
        "",
        "# Per-repo settings:",
        "# [repos.shop]",
        '# protected = ["main", "v*"]   # refs whose runs may get secrets and deploy',
        "#                               # (default: the default branch and every tag)",
        "# reject_invalid = false       # true: refuse pushes with an invalid .pipeline.toml",
        "",
    ]
    return "\n".join(out)

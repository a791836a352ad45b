"""Registering bare repositories and installing the hooks into them."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import site
import subprocess
import sys
from pathlib import Path

from gitpipe import git, resources
from gitpipe.errors import UsageError
from gitpipe.settings import Settings
from gitpipe.store import Store

HOOKS = ("post-receive", "pre-receive")
MARKER = "gitpipe"  # our hooks mention it on their first comment line
GC_MARK = "gitpipe.autogc"  # "daemon": gitpipe turned receive.autogc off, `repo remove` turns it back
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def repo_name(path: Path, name: str | None) -> str:
    """The name a repo is registered under: --name, else the folder name without `.git`."""
    chosen = name or path.name.removesuffix(".git")
    if not NAME.match(chosen):
        raise UsageError(f'"{chosen}" is not a usable repo name (letters, digits, "_", "-", ".")',
                         hint="pass --name NAME")
    return chosen


def add(settings: Settings, store: Store, path: str, name: str | None, create: bool) -> tuple[str, Path]:
    """Register a bare repo (creating it with `create`) and install the hooks."""
    p = Path(path).expanduser().absolute()
    # Check the name before --create makes anything: a refused name must leave no repo behind.
    chosen = repo_name(p, name)
    existing = [r for r in store.repos() if r.name == chosen and r.path != str(p)]
    if existing:
        raise UsageError(f'a repo named "{chosen}" is already registered ({existing[0].path})',
                         hint="pass --name to choose another name")
    repo = git.create_bare(p) if create else git.open_bare(p)
    install_hooks(settings, Path(repo.path), chosen)
    _gc_by_daemon(Path(repo.path))
    store.add_repo(chosen, str(p))
    return chosen, p


def install_hooks(settings: Settings, git_dir: Path, name: str) -> None:
    """Write our hooks; a hook that was there before is kept as HOOK.chained and still runs."""
    hooks_dir = git_dir / "hooks"
    hooks_dir.mkdir(exist_ok=True)
    # gitpipe's own folder first, then site-packages (plugins' action types are validated in the hook)
    libdir = ":".join(dict.fromkeys([str(Path(__file__).resolve().parent.parent), *site.getsitepackages()]))
    perl = shutil.which("perl")
    if perl and (len(perl) > 120 or not perl.isprintable() or " " in perl):  # a #! line: cut at 127 bytes, split at spaces
        perl = None
    for hook in HOOKS:
        target = hooks_dir / hook
        if target.exists() and not _ours(target):
            chained = hooks_dir / f"{hook}.chained"
            if chained.exists():
                raise UsageError(f"{target} exists and so does {chained}",
                                 hint="merge them into one hook by hand, then run `gitpipe repo add` again")
            target.rename(chained)
        # perl (Essential on Debian) runs hooks/post-receive, the client of the daemon's socket;
        # without it the sh hook starts Python for each push
        source = f"{hook}-sh" if hook == "post-receive" and not perl else hook
        text = (resources.folder("hooks") / source).read_text()
        values = {"PYTHON": sys.executable, "LIBDIR": libdir, "HOME": str(settings.home), "REPO": name,
                  "PERL": perl or ""}
        for key, value in values.items():
            text = (text.replace(f"@{key}_Q@", shlex.quote(value)).replace(f"@{key}_PL@", _perl_quote(value))
                    .replace(f"@{key}@", value))
        tmp = hooks_dir / f".{hook}.gitpipe-tmp"
        tmp.write_text(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)


def _gc_by_daemon(git_dir: Path) -> None:
    """Turn receive.autogc off: the `git gc --auto` that receive-pack starts after the hooks of
    every push (2-4 ms it waits for, most pushes for nothing to do) is started by the daemon a
    moment after the push instead (intakeserver.py), off the push's path. A value set by hand is
    kept. While the daemon is down nothing collects; the next push it takes does."""
    if _git_config(git_dir, "--get", "receive.autogc").returncode == 0:
        return  # set by hand, or by an earlier `repo add`
    for key, value in (("receive.autogc", "false"), (GC_MARK, "daemon")):
        if _git_config(git_dir, key, value).returncode != 0:
            raise UsageError(f"could not set {key} in {git_dir / 'config'}", hint="check that file, then run `gitpipe repo add` again")


def _git_config(git_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", f"--git-dir={git_dir}", "config", "--local", *args], capture_output=True,
                          text=True, check=False)


def _perl_quote(value: str) -> str:
    """A Perl string literal of `value` (single quotes: nothing in it is interpolated)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _ours(path: Path) -> bool:
    try:
        head = path.read_text(errors="replace").splitlines()[:3]
    except OSError:
        return False
    return any(f"{MARKER} " in line and "hook" in line for line in head[1:])


def remove(store: Store, name: str) -> None:
    """Unregister a repo (its history is kept); its hooks are taken out, chained ones restored."""
    path = Path(store.repo_path(name))
    store.remove_repo(name)
    if _git_config(path, "--get", GC_MARK).stdout.strip() == "daemon":  # git's own gc after each push again
        _git_config(path, "--unset", "receive.autogc")
        _git_config(path, "--unset", GC_MARK)
    for hook in HOOKS:
        target = path / "hooks" / hook
        if target.exists() and _ours(target):
            target.unlink()
            chained = path / "hooks" / f"{hook}.chained"
            if chained.exists():
                chained.rename(target)

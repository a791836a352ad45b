"""Trust is decided on the host: which refs are protected, which secrets an action gets."""

from __future__ import annotations

from gitpipe import git
from gitpipe.errors import ActionError
from gitpipe.refs import short_ref
from gitpipe.secrets import Masker, load_secrets, ref_protected, secrets_for
from gitpipe.settings import Settings


def protected_patterns(settings: Settings, repo: str, repo_path: str) -> tuple[str, ...]:
    """[repos.NAME] protected, else the repo's default branch and every tag."""
    configured = settings.repo(repo).protected
    if configured is not None:
        return configured
    return (git.default_branch_of(repo_path), "refs/tags/*")


def is_protected(settings: Settings, repo: str, repo_path: str, ref: str) -> bool:
    """Whether runs of `ref` may get secrets and deploy (and have their artifacts published)."""
    patterns = protected_patterns(settings, repo, repo_path)
    if ref.startswith("refs/tags/") and "refs/tags/*" in patterns:
        return True
    return ref_protected(tuple(p for p in patterns if p != "refs/tags/*"), ref)


class Trust:
    """Loaded at daemon start (a secrets.toml with loose permissions stops it right there)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        load_secrets(settings.secrets_path)

    def protected_patterns(self, repo: str, repo_path: str) -> tuple[str, ...]:
        return protected_patterns(self.settings, repo, repo_path)

    def is_protected(self, repo: str, repo_path: str, ref: str) -> bool:
        return is_protected(self.settings, repo, repo_path, ref)

    def require(self, repo: str, repo_path: str, ref: str, what: str) -> None:
        """ActionError naming the ref and the setting when `ref` may not get `what`."""
        if self.is_protected(repo, repo_path, ref):
            return
        shown = ", ".join("every tag" if p == "refs/tags/*" else p
                          for p in self.protected_patterns(repo, repo_path))
        raise ActionError(
            f'ref "{short_ref(ref)}" is not protected, so its runs may not {what} '
            f"(protected refs of {repo}: {shown})",
            hint=f"to allow it, add it to [repos.{repo}] protected = [...] in {self.settings.config_path}")

    def for_action(self, repo: str, repo_path: str, ref: str,
                   names: tuple[str, ...]) -> tuple[dict[str, str], Masker]:
        """The secrets an action asked for, and a masker for every secret of the repo."""
        everything = load_secrets(self.settings.secrets_path)
        masker = Masker(list(everything.get(repo, {}).values()))
        if not names:
            return {}, masker
        self.require(repo, repo_path, ref, "receive secrets")
        return secrets_for(everything, repo, names, path=str(self.settings.secrets_path)), masker

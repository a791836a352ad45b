"""Keeps the site current: after each state change, re-render the pages it changed.

`on_event` is a store listener: it runs on the thread that changed the state, so it
only marks the run dirty and, unless another thread is rendering already (that one
will pick the mark up), renders the pages the event changed. Every event changes the
run's page; only a run's own change of status (queued, running, waiting, finished), a
decision on an approval, a release, or an action failing (the listings count allowed
failures) changes the listings too: the repo's index (and the archived page holding
the run), the top index, the branch's badge, and the environments page when the run
deploys. Logs grow without state changes, so while runs are active a small thread
re-renders the pages whose logs grew.

In the daemon (`background=True`) a thread of the reporter's own renders, and it
coalesces: a run's change of status is rendered at once, but actions and stages
starting and finishing are rendered at most once per LIVE_GAP. A live run's page reloads
itself every render.REFRESH seconds, longer than that window, so what a reader sees is
the same; a run of short actions no longer pays for a render after each one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from gitpipe import git, trust
from gitpipe.errors import GitpipeError
from gitpipe.models import Event, EventKind, RunRecord, RunStatus
from gitpipe.refs import short_ref
from gitpipe.report import badge, data, files, listing, views
from gitpipe.report.logview import LogReader
from gitpipe.report.render import Renderer
from gitpipe.settings import Settings
from gitpipe.store import Store

log = logging.getLogger("gitpipe")
LIVE_INTERVAL = 2.0  # seconds between checks of growing logs
# Seconds the rendering thread rests after rendering: the events of that time become one render.
# Without it a run of short actions re-rendered its pages after each one, and the pages cost the
# daemon more CPU than the actions (measured, issue 11: 55% of its busy samples for 20 `true`s).
RENDER_GAP = 0.25
# Seconds at least between two renders of what actions and stages changed (a run's page): shorter
# than render.REFRESH, the period a live run page reloads itself at, so a reader sees no difference.
# The renders of 20 `true` actions fell from about 8 to 3 per run (issue 11).
LIVE_GAP = 1.0
# Action statuses that change the listings too (their count of allowed failures).
LISTED_ACTION = frozenset({"failed", "timed-out"})


def run_url(settings: Settings, repo: str, run_id: int) -> str:
    """The run page's path relative to the site root (prefix it with site_url)."""
    return files.run_href(repo, run_id)


def _changes_listings(event: Event) -> bool:
    """Whether the event changes what the listings show of its run (else only its own page)."""
    if event.kind in (EventKind.STAGE, EventKind.ACTION):
        return event.kind is EventKind.ACTION and event.status in LISTED_ACTION
    return True


class Reporter:
    """Renders the static report site under `settings.site_dir` from the store."""

    def __init__(self, settings: Settings, store: Store, *, background: bool = False,
                 compiled: Path | None = None) -> None:
        """`background`: render in a thread of the reporter's own, so the thread that changed a
        run's state (an action finishing) never waits for pages (the daemon uses this).
        `compiled`: where to keep the compiled templates between processes (see Renderer)."""
        self.settings = settings
        self.store = store
        self.site = Path(settings.site_dir)
        self.renderer = Renderer(compiled)
        self.logs = LogReader()
        self.count = listing.Counter(store)
        self._lock = threading.Lock()  # guards the dirty marks and the live thread handle
        self._busy = threading.Lock()  # held by the thread that renders
        self._dirty: set[int] = set()  # runs whose page to render
        self._listed: set[int] = set()  # runs whose listings (repo pages, index, badge) to render too
        self._deploys: set[int] = set()
        self._assets = False
        self._live: threading.Thread | None = None
        self._stop = threading.Event()
        self._seen: dict[int, int] = {}  # run id -> bytes of its logs when its page was rendered
        self._wake = threading.Event()  # something is marked
        self._urgent = threading.Event()  # a run's status is among the marks: render now
        self._last = 0.0  # time.monotonic() of the last render of the rendering thread
        self._renderer_thread: threading.Thread | None = None
        if background:
            self._renderer_thread = threading.Thread(target=self._render_loop, name="report", daemon=True)
            self._renderer_thread.start()

    # ------------------------------------------------------------------ events
    def on_event(self, event: Event) -> None:
        """Mark the event's run dirty and render what changed (never raises)."""
        try:
            listed = _changes_listings(event)
            with self._lock:
                self._dirty.add(event.run_id)
                if listed:
                    self._listed.add(event.run_id)
                if event.kind is EventKind.RELEASE:  # the environments page changes too
                    self._deploys.add(event.run_id)
            if self._renderer_thread is not None:
                if listed:
                    self._urgent.set()
                self._wake.set()  # a burst of events becomes one render
            else:
                self._drain()
        except Exception:  # the report must never break the run that sent the event
            log.exception("report: could not render the pages of run #%s", event.run_id)

    def _drain(self) -> None:
        while True:
            if not self._busy.acquire(blocking=False):
                return  # the rendering thread sees our mark before it lets go
            try:
                while batch := self._take():
                    self._update(*batch)
            finally:
                self._busy.release()
            with self._lock:
                if not self._dirty:
                    return

    def _take(self) -> tuple[set[int], set[int], set[int]] | None:
        with self._lock:
            if not self._dirty:
                return None
            batch = (self._dirty, self._listed, self._deploys)
            self._dirty, self._listed, self._deploys = set(), set(), set()
            return batch

    def _update(self, run_ids: set[int], listed: set[int], deploys: set[int]) -> None:
        """Render the pages of `run_ids`; the listings only for `listed` and `deploys`."""
        self._ensure_assets()
        repos = self._repos_of(run_ids | deploys)
        touched: dict[str, list[int]] = {}
        badges: set[tuple[str, str]] = set()
        for run_id in sorted(i for i in run_ids if i in repos):
            page = self._render_run(run_id)
            if run_id not in listed:
                continue  # an action or a stage changed: the run's page shows it, the listings do not
            touched.setdefault(page.run.repo, []).append(run_id)
            if any(a.type == "deploy" for s in page.stages for a in s.actions):
                deploys.add(run_id)
            if page.run.finished and page.run.ref_kind == "branch":
                badges.add((page.run.repo, page.run.ref))
        for repo, branch in sorted(badges):
            self._render_badge(repo, branch)
        for repo, ids in touched.items():
            self._render_repo(repo, ids)
        for repo in self._deploy_repos(deploys, repos):
            self._render_environments(repo)
        if touched or deploys:
            self._render_index()
        self._start_live()

    def _repos_of(self, run_ids: set[int]) -> dict[int, str]:
        """The repo of each run that exists (a rollback by hand sends run id 0)."""
        return self.store.repos_of_runs(run_ids)

    def _deploy_repos(self, deploys: set[int], repos: dict[int, str]) -> set[str]:
        """Repos whose environments page to render; every deploying repo for an event without a run."""
        found = {repos[i] for i in deploys if i in repos}
        if any(i not in repos for i in deploys):
            found |= set(self.store.repos_with_releases())
        return found

    # ------------------------------------------------------------------ pages
    def render_run(self, run_id: int) -> Path:
        """Render one run's page (and publish its logs and artifacts); its path."""
        page = self._render_run(run_id)
        return self.site / page.run.href

    def _render_run(self, run_id: int) -> views.RunPage:
        page = views.run_page(self.store, self.logs, self.site, run_id, self._unpublished(run_id))
        html = self.renderer.page("run.html", "../../", page=page, run=page.run)
        files.write_atomic(self.site / page.run.href, html)
        if page.run.finished:
            self._seen.pop(run_id, None)
        else:
            self._seen[run_id] = self._log_bytes(run_id)
        return page

    def _unpublished(self, run_id: int) -> str | None:
        """Why this run's artifacts stay off the site ([publish_artifacts]), or None to publish."""
        policy = self.settings.publish_artifacts
        if policy == "all":
            return None
        if policy == "none":
            return 'kept, not published (publish_artifacts = "none")'
        rec = self.store.run(run_id)
        try:
            if trust.is_protected(self.settings, rec.repo, self.store.repo_path(rec.repo), rec.ref):
                return None
        except GitpipeError:  # a repo removed since: do not publish
            pass
        return f'kept, not published: {short_ref(rec.ref)} is not a protected ref (publish_artifacts = "protected")'

    def _render_repo(self, repo: str, run_ids: list[int]) -> int:
        """The repo's index, archived pages holding `run_ids`, and newly archived pages."""
        total = self.count(repo)
        self._write("index", listing.repo_index(self.store, repo, total), files.repo_href(repo))
        top = listing.archived(total)
        blocks = {b for b in (listing.block_of(self.store, repo, i, total) for i in run_ids) if b <= top}
        if top and not (self.site / files.block_href(repo, top)).exists():
            blocks |= {b for b in (top, top - 1) if b >= 1}  # a new archived page; its older neighbour links to it
        for b in sorted(blocks):
            self._write("block", listing.repo_block(self.store, repo, b, total), files.block_href(repo, b))
        return 1 + len(blocks)

    def _write(self, kind: str, page: listing.RepoPage, href: str) -> None:
        self._ensure_pages(page.runs)
        shown = None
        if kind == "index":
            default = self._default_branch(page.repo)
            last = self.store.last_finished(page.repo, f"refs/heads/{default}") if default else None
            shown = badge.badge(page.pipeline, last.status.value if last else None)
        files.write_atomic(self.site / href, self.renderer.page("repo.html", "../", page=page, kind=kind, b=shown,
                                                                badge=self._badge_markdown(page),
                                                                site_url=self.settings.site_url))

    def _badge_markdown(self, page: listing.RepoPage) -> str:
        """The Markdown a README shows the badge with (absolute when site_url is set)."""
        base = f"{self.settings.site_url}/" if self.settings.site_url else ""
        return f"[![{page.pipeline}]({base}{badge.href(page.repo, None)})]({base}{files.repo_href(page.repo)})"

    def _default_branch(self, repo: str) -> str | None:
        try:
            return git.default_branch_of(self.store.repo_path(repo))
        except GitpipeError:  # removed since: no default-branch badge
            return None

    def _render_badge(self, repo: str, branch: str) -> None:
        """The badge of a branch (and <repo>/badge.svg when it is the default branch)."""
        last = self.store.last_finished(repo, f"refs/heads/{branch}")
        svg = self.renderer.page("badge.svg", "", b=badge.badge(last.pipeline if last else repo,
                                                               last.status.value if last else None))
        files.write_if_changed(self.site / badge.href(repo, branch), svg)  # most runs keep the colour
        if branch == self._default_branch(repo):
            files.write_if_changed(self.site / badge.href(repo, None), svg)

    def _render_badges(self, repo: str) -> int:
        """Every branch's badge and the default branch's (`gitpipe report`)."""
        branches = set(self.store.branches_with_runs(repo))
        default = self._default_branch(repo)
        if default:
            branches.add(default)
        for branch in sorted(branches):
            self._render_badge(repo, branch)
        return len(branches)


    def _ensure_pages(self, runs: tuple[views.RunView, ...]) -> None:
        """Render the pages of listed runs that have none yet, so a listing never links to a missing
        page (a run another process made, before the daemon heard of it)."""
        for run in runs:
            if not (self.site / run.href).exists():
                self._render_run(run.id)

    def render_environments(self, repo: str) -> int:
        """Render a repo's environments page (what a rollback by hand changed); pages written."""
        with self._busy:
            self._ensure_assets()
            return self._render_environments(repo)

    def _render_environments(self, repo: str) -> int:
        envs = data.environments(self.store, repo)
        if not envs:
            return 0
        html = self.renderer.page("environments.html", "../", repo=repo, environments=envs)
        files.write_atomic(self.site / files.environments_href(repo), html)
        return 1

    def _render_index(self) -> None:
        page = listing.top_index(self.store, self.count)
        self._ensure_pages(page.recent + tuple(c.last for c in page.cards if c.last))
        files.write_atomic(self.site / "index.html", self.renderer.page("index.html", "", page=page))

    def _ensure_assets(self) -> None:
        if self._assets:
            return
        files.write_if_changed(self.site / "site.css", self.renderer.stylesheet())
        files.write_if_changed(self.site / "site.js", self.renderer.script())
        self._assets = True

    # ------------------------------------------------------------------ everything
    def render_all(self) -> int:
        """Render every page of the site (what `gitpipe report` does); how many were written."""
        with self._busy:
            self._assets = False
            self._ensure_assets()
            written = 1
            for repo in self._all_repos():
                written += self._render_everything_of(repo)
            self._render_index()
        self._drain()  # events that came in meanwhile
        return written

    def _all_repos(self) -> list[str]:
        return sorted(set(self.store.repos_with_runs()) | {r.name for r in self.store.repos()})

    def _render_everything_of(self, repo: str) -> int:
        ids = self.store.run_ids(repo)
        for run_id in ids:
            self._render_run(run_id)
        total = len(ids)
        self._write("index", listing.repo_index(self.store, repo, total), files.repo_href(repo))
        top = listing.archived(total)
        for b in range(1, top + 1):
            self._write("block", listing.repo_block(self.store, repo, b, total), files.block_href(repo, b))
        self._render_badges(repo)  # not pages: not counted
        return len(ids) + 1 + top + self._render_environments(repo)

    # ------------------------------------------------------------------ growing logs
    def _start_live(self) -> None:
        with self._lock:
            if self._live is not None or self._stop.is_set() or not self._seen:
                return
            self._live = threading.Thread(target=self._live_loop, name="report-live", daemon=True)
            self._live.start()

    def _live_loop(self) -> None:
        while not self._stop.wait(LIVE_INTERVAL):
            active = self.store.runs_with_status(RunStatus.RUNNING, RunStatus.WAITING, RunStatus.QUEUED)
            with self._lock:
                if not active:
                    self._live = None
                    return
                self._dirty |= {r.id for r in active if self._grew(r)}
            try:
                self._drain()
            except Exception:
                log.exception("report: could not refresh the pages of running runs")

    def _grew(self, run: RunRecord) -> bool:
        return self._log_bytes(run.id) != self._seen.get(run.id, 0)

    def _log_bytes(self, run_id: int) -> int:
        try:
            return sum(e.stat().st_size for e in os.scandir(self.settings.logs_dir / str(run_id)) if e.is_file())
        except OSError:
            return 0

    def _render_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            # Actions and stages wait for the window to close; a run's change of status does not.
            while not self._stop.is_set() and not self._urgent.is_set():
                left = self._last + LIVE_GAP - time.monotonic()
                if left <= 0:
                    break
                self._urgent.wait(left)
            self._wake.clear()
            self._urgent.clear()
            try:
                self._drain()
            except Exception:  # the report must never take the daemon down
                log.exception("report: could not render pages")
            self._last = time.monotonic()
            self._stop.wait(RENDER_GAP)

    def close(self) -> None:
        """Render what is still marked, then stop the reporter's threads (the daemon calls this when it stops)."""
        self._stop.set()
        if self._renderer_thread is not None:
            self._wake.set()
            self._urgent.set()
            self._renderer_thread.join()
            try:
                self._drain()
            except Exception:
                log.exception("report: could not render pages")
        with self._lock:
            live = self._live
        if live is not None:
            live.join()

"""The listing pages: the top index (every pipeline) and a repo's history, paginated.

A repo's history is cut into blocks of PAGE_SIZE runs counted from its oldest run, so
an archived page never changes when new runs come (block 1 = the oldest runs). The
repo's index.html shows the newest full block and the runs after it (PAGE_SIZE to
2 * PAGE_SIZE - 1 runs); when another block fills up, it becomes an archived page. So
updating after a run costs the same with 100 or 10,000 runs in the history.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gitpipe.models import RunStatus
from gitpipe.report import charts, files
from gitpipe.report.views import RATE_WINDOW, RECENT, TREND, RunView, point, run_view
from gitpipe.store import Store

P = files.PAGE_SIZE


@dataclass(frozen=True)
class PageLink:
    """A link of the pager."""

    label: str
    href: str | None  # None: the page shown, or a gap ("…")


@dataclass(frozen=True)
class RepoPage:
    """A page of a repo's history (its index, or an archived block)."""

    repo: str
    pipeline: str
    runs: tuple[RunView, ...]  # newest first
    chart: charts.Chart
    total: int
    block: int  # 0: the index page
    newer: str | None  # hrefs relative to the site root
    older: str | None
    oldest: str | None
    pages: tuple[PageLink, ...]
    has_envs: bool

    @property
    def newest(self) -> str:
        return files.repo_href(self.repo)

    @property
    def live(self) -> bool:
        return any(not r.finished for r in self.runs)


class Counter:
    """Runs per repo, counted once and then only the runs added since (runs are never deleted,
    and ids only grow), so keeping the site current does not slow down as the history grows."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._seen: dict[str, tuple[int, int]] = {}  # repo -> (highest id counted, count)

    def __call__(self, repo: str) -> int:
        last, n = self._seen.get(repo, (0, 0))
        added, top = self.store.runs_after(repo, last)
        if added:
            last, n = top, n + added
            self._seen[repo] = (last, n)
        return n


def archived(total: int) -> int:
    """How many blocks of the history are archived pages (the newest full one never is)."""
    return max(0, total // P - 1)


def block_of(store: Store, repo: str, run_id: int, total: int) -> int:
    """The block holding a run (1 = the oldest PAGE_SIZE runs of the repo); counts the newer runs,
    few for the runs that change."""
    newer, _ = store.runs_after(repo, run_id)
    return (total - newer - 1) // P + 1


def repo_index(store: Store, repo: str, total: int) -> RepoPage:
    """The newest runs of a repo, with links to the archived pages."""
    shown = total - P * archived(total)
    runs = [run_view(r) for r in store.runs(repo, limit=max(shown, 1))]
    top = archived(total)
    older = files.block_href(repo, top) if top else None
    oldest = files.block_href(repo, 1) if top > 1 else None
    return _page(store, repo, runs, total, 0, None, older, oldest, pager(repo, top))


def repo_block(store: Store, repo: str, block: int, total: int) -> RepoPage:
    """One archived page: the runs of block `block`, newest first."""
    runs = [run_view(r) for r in store.runs(repo, limit=P, offset=total - block * P)]
    top = archived(total)
    newer = files.repo_href(repo) if block >= top else files.block_href(repo, block + 1)
    older = files.block_href(repo, block - 1) if block > 1 else None
    oldest = files.block_href(repo, 1) if block > 2 else None
    return _page(store, repo, runs, total, block, newer, older, oldest, ())


def _page(store: Store, repo: str, runs: list[RunView], total: int, block: int, newer: str | None,
          older: str | None, oldest: str | None, pages: tuple[PageLink, ...]) -> RepoPage:
    chart = charts.bar_chart([point(r, "../") for r in reversed(runs)])
    pipeline = runs[0].pipeline if runs else repo
    return RepoPage(repo, pipeline, tuple(runs), chart, total, block, newer, older, oldest, pages,
                    store.has_releases(repo))


def pager(repo: str, top: int, edge: int = 3) -> tuple[PageLink, ...]:
    """Page links of the index: 1 (itself), then archived pages, the middle ones left out."""
    if not top:
        return ()
    numbers = list(range(2, top + 2))  # display number d shows block top + 2 - d
    if len(numbers) > 2 * edge + 1:
        numbers = numbers[:edge] + [0] + numbers[-edge:]
    links = [PageLink("1", None)]
    for d in numbers:
        links.append(PageLink("…", None) if d == 0 else PageLink(str(d), files.block_href(repo, top + 2 - d)))
    return tuple(links)


# --------------------------------------------------------------------------- the top index


@dataclass(frozen=True)
class PipelineCard:
    """One pipeline on the top index."""

    repo: str
    pipeline: str
    last: RunView | None
    rate: int | None  # percent of the last finished runs that succeeded (cancelled ones left out)
    rated: int  # how many runs the rate is over
    trend: charts.Chart
    total: int
    active: int
    has_envs: bool

    @property
    def href(self) -> str:
        return files.repo_href(self.repo)

    @property
    def environments_href(self) -> str:
        return files.environments_href(self.repo)


@dataclass(frozen=True)
class IndexPage:
    """The top index: every pipeline, the latest runs."""

    cards: tuple[PipelineCard, ...]
    recent: tuple[RunView, ...]

    @property
    def live(self) -> bool:
        return any(not r.finished for r in self.recent)


def top_index(store: Store, count: Callable[[str], int]) -> IndexPage:
    """Every pipeline with its last run, success rate and trend; the latest runs of the host."""
    cards = tuple(card(store, r.name, count(r.name)) for r in store.repos())
    recent = tuple(run_view(r) for r in store.runs(None, limit=RECENT))
    return IndexPage(cards, recent)


def card(store: Store, repo: str, total: int) -> PipelineCard:
    """One pipeline's summary, from its last RATE_WINDOW runs only."""
    runs = [run_view(r) for r in store.runs(repo, limit=RATE_WINDOW)]
    settled = [r for r in runs if r.status in (RunStatus.SUCCEEDED.value, RunStatus.FAILED.value)]
    ok = sum(r.status == RunStatus.SUCCEEDED.value for r in settled)
    rate = round(100 * ok / len(settled)) if settled else None
    trend = charts.sparkline([point(r) for r in reversed(runs[:TREND])], TREND)
    active = sum(not r.finished for r in runs)
    return PipelineCard(repo, runs[0].pipeline if runs else repo, runs[0] if runs else None, rate,
                        len(settled), trend, total, active, store.has_releases(repo))

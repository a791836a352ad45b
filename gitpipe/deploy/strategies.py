"""Rolling and blue-green deploys and the rollback command, written once against `Target`.

Rolling: upload the release to every target (in parallel); only when every upload succeeded,
target by target: before_switch, switch `current`, after_switch, healthcheck (with retries).
Then the `monitor` window. A failure before the first switch fails the deploy with `current`
untouched everywhere; a failure after it switches every switched target back and runs
after_switch again there for the restored release.

Blue-green: the slots `<path>/blue` and `<path>/green` are symlinks to release directories
in releases/ (so history, keep and manifests work exactly as in rolling). The new release is
uploaded to releases/, the idle slot (the one `current` does not point at) is pointed at it,
and before_switch and the healthcheck run there (cwd = the slot, GITPIPE_SLOT set). Only when
every target passed does `current` switch to the slot (`current -> green`), then after_switch
and the monitor window run. The live slot is never touched, so a rollback is one switch of
`current` back to it. If a target fails before the switch, idle slots get their old link back.

Scripts get GITPIPE_RELEASE (the release directory, also in blue-green), GITPIPE_PREVIOUS_RELEASE
(empty on a first deploy), GITPIPE_ENVIRONMENT, GITPIPE_RUN, GITPIPE_SHA, and GITPIPE_SLOT.
`healthcheck_retries` counts retries, like an action's `retries`: 3 means up to 4 attempts.
During the monitor window (`monitor`, checked every `monitor_interval`, default 10 s) each check
is a single attempt: any failure rolls back.

The rollback command switches `current` back (blue-green: to the other slot, pointed at the
release first if it holds another), then runs after_switch and the healthcheck there with the
scripts of the deploy action that deployed that release. A failure there is reported, and
nothing is switched back: the release being left is the one the rollback gets away from.

Weak spot: unchanged files are hard links shared with the previous release. A script that
writes into such a file in place (`>>`, not `sed -i`, which replaces) changes both releases.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from gitpipe.deploy import manifest
from gitpipe.deploy.context import DEPLOYED, ROLLED_BACK, DeployContext, DeployResult
from gitpipe.deploy.manifest import Entry
from gitpipe.deploy.session import Session, Site
from gitpipe.deploy.targets import SLOTS, Log, other_slot, release_key
from gitpipe.errors import DeployError, UsageError
from gitpipe.models import ActionSpec

HEALTHCHECK_PAUSE = 2.0  # seconds between healthcheck attempts
HEALTHCHECK_TIMEOUT = 120.0  # one healthcheck attempt taking longer counts as failed


class Scripts:
    """A deploy action's scripts (before_switch, after_switch, healthcheck) run on open targets."""

    def __init__(self, spec: ActionSpec, ctx: DeployContext, session: Session, log: Log) -> None:
        self.spec, self.ctx = spec, ctx
        self.sites = session.sites
        self.session = session
        self.log = log

    def env(self, site: Site, release: str | None, previous: str | None, slot: str | None) -> dict[str, str]:
        t = site.target
        env = {
            "GITPIPE_RELEASE": t.release_dir(release) if release else "",
            "GITPIPE_PREVIOUS_RELEASE": t.release_dir(previous) if previous else "",
            "GITPIPE_ENVIRONMENT": self.ctx.environment,
            "GITPIPE_RUN": str(self.ctx.run_id),
            "GITPIPE_SHA": self.ctx.sha,
        }
        if slot:
            env["GITPIPE_SLOT"] = slot
        return env

    def script(self, site: Site, name: str, body: str | None, cwd: str, env: dict[str, str]) -> None:
        """Run one of before_switch / after_switch; a non-zero exit is a DeployError."""
        if not body:
            return
        self.log(f"{site.url}: running {name}")
        status = site.target.run_script(body, cwd, env, self.log)
        if status != 0:
            raise DeployError(f"{name} failed on {site.url} (exit status {status})",
                              hint="its output is in the log above")

    def healthcheck(self, site: Site, cwd: str, env: dict[str, str], attempts: int) -> None:
        """Run the healthcheck up to `attempts` times, HEALTHCHECK_PAUSE apart."""
        body = self.spec.healthcheck
        if not body:
            return
        status = 0
        for attempt in range(1, attempts + 1):
            status = site.target.run_script(body, cwd, env, self.log, HEALTHCHECK_TIMEOUT)
            if status == 0:
                self.log(f"{site.url}: healthcheck passed")
                return
            self.log(f"{site.url}: healthcheck failed (exit status {status}), attempt {attempt} of {attempts}")
            if attempt < attempts:
                time.sleep(HEALTHCHECK_PAUSE)
        raise DeployError(f"healthcheck failed on {site.url} after {attempts} attempt(s) (exit status {status})")


class Deployment(Scripts):
    """One deploy of one release to the open targets of a session."""

    def __init__(self, spec: ActionSpec, source: Path, ctx: DeployContext, session: Session,
                 shared: tuple[str, ...], scanned: Future[list[Entry]], log: Log) -> None:
        super().__init__(spec, ctx, session, log)
        self.source = source
        self.scanned = scanned  # manifest.scan of `source`, started before connecting
        self.shared = shared
        self.release = ctx.release

    # ------------------------------------------------------------------ upload

    def upload_all(self) -> None:
        """Put the complete release on every target, in parallel; raise if any upload failed."""
        entries = self.scanned.result()
        with ThreadPoolExecutor(max_workers=len(self.sites)) as pool:
            futures = [pool.submit(self._upload, site, entries) for site in self.sites]
        errors: list[DeployError] = []
        for f in futures:
            e = f.exception()
            if e is not None and not isinstance(e, DeployError):
                raise e  # a bug, not a failed deploy
            if e is not None:
                errors.append(e)
        if errors:
            raise DeployError("; ".join(str(e) for e in errors))

    def _upload(self, site: Site, entries: list[Entry]) -> None:
        t, state, release = site.target, site.state, self.release
        wanted = manifest.dumps(entries)
        if release in state.complete:
            if t.read_manifest(release) == wanted:
                self.log(f"{t.url}: release {release} is already there, complete and identical")
                return
            if release in live_releases(site):
                raise DeployError(f"{t.url}: release {release} is in use there and differs from this build",
                                  hint="deploy a new run instead of rebuilding this one")
        base = state.current if state.current in state.complete else None
        base = base or next((r for r in reversed(state.complete) if r != release), None)
        if base == release:
            base = state.before(release)
        previous = manifest.loads(t.read_manifest(base) or b"") if base else {}
        plan = manifest.plan(entries, base, previous)
        files = sum(1 for e in plan.sent if e.kind == "f")
        self.log(f"{t.url}: uploading release {release}: {files} files ({_size(plan.bytes_to_send)}) to send, "
                 f"{len(plan.linked)} unchanged files linked from {plan.base or '-'}")
        started = time.monotonic()
        try:
            t.upload(release, self.source, plan, self.shared, self.log)
        except DeployError:
            try:
                t.remove_releases([release])  # the partial release; fails too if the link is dead
            except DeployError:
                pass
            raise
        self.log(f"{t.url}: release {release} complete in {time.monotonic() - started:.1f}s")

    def monitor(self, where: Callable[[Site], tuple[str, dict[str, str]]]) -> None:
        """Keep running the healthcheck on every target for `monitor` seconds; raise on a failure."""
        if self.spec.monitor <= 0:
            return
        if not self.spec.healthcheck:
            self.log("monitor is set but there is no healthcheck to run: nothing to watch")
            return
        interval = self.spec.monitor_interval
        self.log(f"monitoring for {self.spec.monitor:.0f}s: healthcheck every {interval:g}s")
        start = time.monotonic()
        while (left := self.spec.monitor - (time.monotonic() - start)) > 0:
            time.sleep(min(interval, left))
            for site in self.sites:
                cwd, env = where(site)
                try:
                    self.healthcheck(site, cwd, env, attempts=1)
                except DeployError as e:
                    raise DeployError(f"{e} during the monitor window, "
                                      f"{time.monotonic() - start:.0f}s after the switch") from e

    # ------------------------------------------------------------------ switching back

    def switch_back(self, cause: DeployError) -> DeployResult:
        """After a failure past the first switch: restore every switched target, rerun after_switch."""
        problems = []
        for site in reversed([s for s in self.sites if s.switched]):
            old_link, old = site.state.links.get("current"), site.state.current
            try:
                site.set_link("current", old_link)
                site.now, site.switched = old, False
                self.log(f"{site.url}: switched back to {old or 'nothing (first deploy: current removed)'}")
            except DeployError as e:
                problems.append(f"could not switch {site.url} back: {e}")
                continue
            if old_link and old:
                cwd = site.target.path(old_link)
                env = self.env(site, old, self.release, site.state.current_slot)
                try:
                    self.script(site, "after_switch", self.spec.after_switch, cwd, env)
                except DeployError as e:
                    problems.append(f"after_switch for the restored release: {e}")
        restored = sorted({s.state.current or "no release (first deploy)" for s in self.sites}, key=release_key)
        message = f"{cause}; every target switched back to {' / '.join(restored)}"
        if problems:  # the outcomes say where `current` points now
            message = f"{cause}; ROLLBACK INCOMPLETE: {'; '.join(problems)}"
        return DeployResult(ROLLED_BACK, self.release, self.session.outcomes(), message)

    def deployed(self) -> DeployResult:
        for site in self.sites:
            self.prune(site)
        urls = ", ".join(s.url for s in self.sites)
        return DeployResult(DEPLOYED, self.release, self.session.outcomes(),
                            f"deployed {self.release} to {urls}")

    def prune(self, site: Site) -> None:
        """Remove complete releases beyond the newest `keep`; never current, the one before it, a slot's."""
        # The state is known without reading it again: we hold the lock, and just made `release` current.
        st, new = site.state, self.release
        complete = sorted(set(st.complete) | {new}, key=release_key)
        older = [r for r in complete if release_key(r) < release_key(new)]
        slots = {s: st.release_of(s) for s in SLOTS}
        if site.slot:
            slots[site.slot] = new
        protected = {new, older[-1] if older else None, st.current, *slots.values()}
        keep = max(1, self.spec.keep)
        old = [r for r in complete[:-keep] if r not in protected]
        leftovers = [r for r in st.incomplete if r != new and release_key(r) < release_key(new)]
        if not old and not leftovers:
            return
        try:
            site.target.remove_releases(old + leftovers)
            self.log(f"{site.url}: removed old releases {', '.join(old + leftovers)} (keep = {keep})")
        except DeployError as e:
            self.log(f"{site.url}: could not remove old releases: {e}")


def live_releases(site: Site) -> set[str]:
    """Releases that `current` or a slot points at when the deploy began."""
    st = site.state
    return {r for r in (st.current, *(st.release_of(s) for s in SLOTS)) if r}


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


# ---------------------------------------------------------------------- strategies


def rolling(d: Deployment) -> DeployResult:
    """Upload everywhere, then per target: before_switch, switch, after_switch, healthcheck."""
    d.upload_all()
    attempts = 1 + max(0, d.spec.healthcheck_retries)
    try:
        for site in d.sites:
            t = site.target
            cwd = t.release_dir(d.release)
            env = d.env(site, d.release, site.state.current, None)
            d.script(site, "before_switch", d.spec.before_switch, cwd, env)
            site.switched = True  # set first: a switch whose answer was lost may still have happened
            site.set_link("current", f"releases/{d.release}")
            site.now = d.release
            d.log(f"{t.url}: current -> releases/{d.release}")
            d.script(site, "after_switch", d.spec.after_switch, cwd, env)
            d.healthcheck(site, cwd, env, attempts)
        d.monitor(lambda s: (s.target.release_dir(d.release), d.env(s, d.release, s.state.current, None)))
    except DeployError as e:
        if not any(s.switched for s in d.sites):
            raise
        return d.switch_back(e)
    return d.deployed()


def blue_green(d: Deployment) -> DeployResult:
    """Upload everywhere, start and check the release in each idle slot, then switch `current`."""
    d.upload_all()
    attempts = 1 + max(0, d.spec.healthcheck_retries)

    def where(site: Site) -> tuple[str, dict[str, str]]:
        assert site.slot
        return site.target.path(site.slot), d.env(site, d.release, site.state.current, site.slot)

    prepared: list[Site] = []
    try:
        for site in d.sites:
            site.slot = other_slot(site.state.current_slot)
            site.set_link(site.slot, f"releases/{d.release}")
            prepared.append(site)
            d.log(f"{site.url}: idle slot {site.slot} -> releases/{d.release}")
            cwd, env = where(site)
            d.script(site, "before_switch", d.spec.before_switch, cwd, env)
            d.healthcheck(site, cwd, env, attempts)
    except DeployError:
        for site in prepared:  # best effort: the idle slot back to what it held
            assert site.slot
            try:
                site.set_link(site.slot, site.state.links.get(site.slot))
            except DeployError as e:
                d.log(f"{site.url}: could not restore slot {site.slot}: {e}")
        raise
    try:
        for site in d.sites:
            assert site.slot
            site.switched = True
            site.set_link("current", site.slot)
            site.now = d.release
            d.log(f"{site.url}: current -> {site.slot} ({d.release})")
            cwd, env = where(site)
            d.script(site, "after_switch", d.spec.after_switch, cwd, env)
        d.monitor(where)
    except DeployError as e:
        return d.switch_back(e)
    return d.deployed()


STRATEGIES: dict[str, Callable[[Deployment], DeployResult]] = {"rolling": rolling, "blue-green": blue_green}


# ---------------------------------------------------------------------- rollback command


def choose_goal(sites: list[Site], to: str | None, candidates: list[str] | None) -> str:
    """The release a rollback goes to: `to`, else the first of `candidates` complete on every target.

    `candidates` are the releases that were good before the current one, most recently live
    first (the caller knows the history); the targets say which are still there. Without a
    history (None), each target's own idea of the previous release (TargetState.previous).
    """
    complete = set.intersection(*(set(s.state.complete) for s in sites))
    listed = ", ".join(sorted(complete, key=release_key)) or "none"
    if to is not None:
        if to not in complete:
            raise UsageError(f'no complete release "{to}" on every target (releases: {listed})',
                             hint="name one of them with --to, or leave --to out to go back to the last good one")
        return to
    if candidates is None:
        return _previous(sites)
    currents = {s.state.current for s in sites}
    if len(currents) > 1:
        found = ", ".join(f"{s.url}: {s.state.current or 'nothing'}" for s in sites)
        raise DeployError(f"the targets disagree on the current release ({found})",
                          hint="name the release to roll back to (--to RELEASE)")
    current = currents.pop()
    for release in candidates:
        if release in complete and release != current:
            return release
    raise DeployError(f"no release that was good before {current or '(none)'} is complete on every target "
                      f"(releases: {listed})", hint="name one with --to RELEASE if you mean it")


def _previous(sites: list[Site]) -> str:
    goals = {}
    for site in sites:
        goal = site.state.previous
        if goal is None:
            raise DeployError(f"{site.url}: no complete release before {site.state.current or '(none)'} "
                              "to roll back to")
        goals[site.url] = goal
    if len(set(goals.values())) > 1:
        listed = ", ".join(f"{u}: {g}" for u, g in goals.items())
        raise DeployError(f"the targets disagree on the previous release ({listed})",
                          hint="name the release to roll back to (--to RELEASE)")
    return next(iter(goals.values()))


def roll_back(session: Session, goal: str, scripts: Scripts | None, log: Log) -> DeployResult:
    """Switch every target to `goal`, then run after_switch and the healthcheck there, as a deploy does.

    A failing after_switch or healthcheck does not switch back (the release left is the one
    being got away from): the result says so in `warning`.
    """
    for site in session.sites:
        if goal not in site.state.complete:
            raise DeployError(f"{site.url}: {goal} is not a complete release there "
                              f"(complete: {', '.join(site.state.complete) or 'none'})")
    try:
        for site in session.sites:
            _switch_to(site, goal, log)
    except DeployError as e:
        for site in session.sites:
            if site.switched:  # undo, so that "failed" still means: current untouched everywhere
                try:
                    site.set_link("current", site.state.links.get("current"))
                except DeployError as undo:
                    log(f"{site.url}: could not switch back: {undo}")
        raise DeployError(f"rollback to {goal} failed, nothing switched: {e}") from e
    problems = _after_rollback(session, goal, scripts, log)
    left = sorted({s.state.current or "nothing" for s in session.sites}, key=release_key)
    message = f"rolled back from {' / '.join(left)} to {goal} on every target"
    warning = "; ".join(problems)
    if warning:
        message += f"; {warning}"
    return DeployResult(ROLLED_BACK, goal, session.outcomes(), message, warning)


def _after_rollback(session: Session, goal: str, scripts: Scripts | None, log: Log) -> list[str]:
    """after_switch and the healthcheck (with its retries) on every switched target; what failed."""
    if scripts is None:
        log("no deploy action known for this release: no after_switch or healthcheck run")
        return []
    problems = []
    attempts = 1 + max(0, scripts.spec.healthcheck_retries)
    for site in session.sites:
        if not site.switched:
            continue
        slot = site.links.get("current") if site.links.get("current") in SLOTS else None
        cwd = site.target.path(slot) if slot else site.target.release_dir(goal)
        env = scripts.env(site, goal, site.state.current, slot)
        try:
            scripts.script(site, "after_switch", scripts.spec.after_switch, cwd, env)
        except DeployError as e:
            problems.append(f"AFTER_SWITCH FAILED: {e}")
            continue
        try:
            scripts.healthcheck(site, cwd, env, attempts)
        except DeployError as e:
            problems.append(f"HEALTHCHECK FAILED: {e}")
    return problems


def _switch_to(site: Site, goal: str, log: Log) -> None:
    st, t = site.state, site.target
    if st.current == goal:
        log(f"{t.url}: {goal} is already current")
        return
    site.switched = True
    if st.current_slot:  # blue-green: one switch back to the other slot, if it holds the release
        other = other_slot(st.current_slot)
        if st.release_of(other) != goal:
            site.set_link(other, f"releases/{goal}")
        site.set_link("current", other)
    else:
        site.set_link("current", f"releases/{goal}")
    site.now = goal
    log(f"{t.url}: current -> {goal}")

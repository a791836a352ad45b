"""Benchmarks of issue 15's command-line features. Prints comparison tables.

    python bench/bench_features.py            # everything (about a minute)
    python bench/bench_features.py artifacts  # one part: artifacts | runs

- artifacts: `gitpipe artifacts RUN NAME --out DIR` (every file checked against its sha256
             while it is copied, then moved into place) against `cp -r` followed by
             `sha256sum -c` of the stored manifest, for one 256 MB file and for 2,000 files
             of 4 kB; median of 3.
- runs:      `gitpipe runs --status failed --ref main --since 2d --json` against plain
             `gitpipe runs --json`, with 10,000 runs in the history; median of 5.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import BIN, median, ms, table, timed, workdir  # noqa: E402

from gitpipe import api, artifacts  # noqa: E402
from gitpipe import settings as settings_mod  # noqa: E402
from gitpipe.queue import NewRun  # noqa: E402
from gitpipe.store import Store  # noqa: E402


def cli(home: Path, *args: str) -> None:
    subprocess.run([str(BIN / "gitpipe"), *args, "--home", str(home)], check=True, capture_output=True)


def new_home(root: Path) -> tuple[Path, Store]:
    api.init_home(str(root / "home"))
    store = Store(settings_mod.load(root / "home"))
    store.add_repo("shop", "/srv/git/shop.git")
    return root / "home", store


def bench_artifacts(root: Path) -> list[tuple[str, str, str, str]]:
    home, store = new_home(root)
    tree = root / "tree"
    (tree / "big").mkdir(parents=True)
    with open(tree / "big" / "blob.bin", "wb") as f:
        for _ in range(256):
            f.write(os.urandom(1 << 20))
    for i in range(2000):
        d = tree / "many" / f"d{i % 20}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.txt").write_bytes(os.urandom(4096))
    [run_id] = store.create_runs([NewRun("shop", "shop", "refs/heads/main", "a" * 40, "push", "")])
    dest = home / "artifacts" / str(run_id)
    for name, glob in (("big", "big/**"), ("many", "many/**")):
        store.add_artifact(artifacts.store(tree, dest, run_id, "make", name, (glob,)))
    rows = []
    for name, label in (("big", "one 256 MB file"), ("many", "2,000 files of 4 kB")):
        ours, base = [], []
        for n in range(3):
            out, copy = root / f"out-{name}-{n}", root / f"cp-{name}-{n}"
            ours.append(timed(partial(cli, home, "artifacts", str(run_id), name, "--out", str(out))))
            base.append(timed(partial(_copy_and_check, dest, name, copy)))
        rows.append((label, ms(median(ours)), ms(median(base)), f"{median(ours) / median(base):.2f}x"))
    return rows


def _copy_and_check(dest: Path, name: str, copy: Path) -> None:
    shutil.copytree(dest / name, copy)
    subprocess.run(["sha256sum", "--quiet", "-c", str(dest / f"{name}.{artifacts.MANIFEST}")],
                   cwd=copy, check=True, capture_output=True)


def bench_runs(root: Path) -> list[tuple[str, str, str, str]]:
    home, store = new_home(root)
    runs = [NewRun("shop", "shop", f"refs/heads/{'main' if i % 3 else 'feat'}", f"{i:040x}", "push", "",
                   error="bad" if i % 7 == 0 else None) for i in range(10_000)]
    store.create_runs(runs)
    store.close()
    plain = median([timed(lambda: cli(home, "runs", "--json", "--limit", "20")) for _ in range(5)])
    filtered = median([timed(lambda: cli(home, "runs", "--status", "failed", "--ref", "main", "--since", "2d",
                                         "--json", "--limit", "20")) for _ in range(5)])
    return [("10,000 runs, 20 shown", ms(filtered), ms(plain), f"{filtered / plain:.2f}x")]


def main() -> None:
    parts = sys.argv[1:] or ["artifacts", "runs"]
    root = workdir()
    try:
        if "artifacts" in parts:
            table("gitpipe artifacts RUN NAME --out DIR vs cp -r + sha256sum -c (median of 3)",
                  bench_artifacts(root / "a"))
        if "runs" in parts:
            table("gitpipe runs --status failed --ref main --since 2d vs gitpipe runs (median of 5)",
                  bench_runs(root / "r"))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

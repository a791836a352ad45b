"""Deploy speed over SSH: gitpipe against `rsync -a` and `scp -r` of the same tree.

A 1,000-file, 50 MB tree of random data goes to a real sshd on 127.0.0.1 (the one the tests
use, from tests/sshd.py). Printed: median of 3 for a full gitpipe deploy, a gitpipe redeploy
with one file changed, rsync and scp, each with its ratio to the faster of rsync and scp; for
context, rsync with one file changed and one bare remote command (`ssh host true`): every
remote command starts the login shell, whose ~/.bashrc can cost more than the transfer.

Run: /tmp/v/bin/python bench/bench_deploy.py   (needs openssh-server, openssh-client, rsync)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from sshd import SshServer, start_sshd, stop_sshd  # noqa: E402  (tests/ is on sys.path now)

from gitpipe.deploy import DeployContext, deploy  # noqa: E402
from gitpipe.models import ActionSpec  # noqa: E402

FILES = 1000
TOTAL = 50 * 1024 * 1024
ROUNDS = 3


def build_tree(root: Path) -> None:
    """FILES files of random data, TOTAL bytes in all, in 20 directories."""
    for i in range(FILES):
        d = root / f"dir{i % 20:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"file{i:04d}.bin").write_bytes(os.urandom(TOTAL // FILES))


def median_time(fn: Callable[[int], None]) -> float:
    times = []
    for i in range(ROUNDS):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def ssh_command(srv: SshServer) -> list[str]:
    return ["ssh", "-p", str(srv.port), "-i", str(srv.identity), "-o", f"UserKnownHostsFile={srv.known_hosts}",
            "-o", "BatchMode=yes"]


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="gitpipe-bench-deploy-"))
    tree = work / "tree"
    build_tree(tree)
    srv, proc = start_sshd(work / "sshd")
    notes: list[str] = []
    try:
        rows = run_all(work, tree, srv, notes)
    finally:
        stop_sshd(proc)
        shutil.rmtree(work, ignore_errors=True)
    best = min(rows["rsync -a"], rows["scp -r"])
    print(f"\ndeploy of {FILES} files, {TOTAL // 2**20} MB over SSH to 127.0.0.1 (median of {ROUNDS})")
    print(f"{'measure':<36}{'seconds':>9}{'ratio':>8}")
    for name, seconds in rows.items():
        print(f"{name:<36}{seconds:>9.3f}{seconds / best:>8.2f}")
    print(f"ratio: against the faster of rsync -a and scp -r ({best:.3f} s)")
    for line in notes:
        print(line)


def run_all(work: Path, tree: Path, srv: SshServer, notes: list[str]) -> dict[str, float]:
    lines: list[str] = []
    ctx = DeployContext(0, "0" * 40, "0000000", "bench", srv.known_hosts, srv.identity, lines.append)

    def gitpipe(target: Path, run: int) -> None:
        spec = ActionSpec(name="deploy", line=1, type="deploy", environment="bench", targets=(srv.url(target),))
        c = DeployContext(run, f"{run:040x}", f"{run:07x}", "bench", ctx.known_hosts, ctx.identity, lines.append)
        result = deploy(spec, tree, c)
        if result.status != "deployed":
            raise SystemExit(f"deploy failed: {result.message}")

    rows: dict[str, float] = {}
    rows["gitpipe deploy (full)"] = median_time(lambda i: gitpipe(work / f"g{i}", 1))

    def redeploy(i: int) -> None:
        (tree / "dir00" / "file0000.bin").write_bytes(os.urandom(TOTAL // FILES))
        gitpipe(work / "g0", 2 + i)

    rows["gitpipe redeploy (1 file changed)"] = median_time(redeploy)
    notes += [f"full deploy:  {_upload_line(lines, 1)}", f"redeploy:     {_upload_line(lines, 2 + ROUNDS - 1)}"]
    ssh = " ".join(ssh_command(srv))
    dest = f"{srv.user}@{srv.host}"
    rows["rsync -a"] = median_time(lambda i: _run(["rsync", "-a", "-e", ssh, f"{tree}/", f"{dest}:{work}/r{i}/"]))
    scp = ["scp", "-q", "-r", "-P", str(srv.port), "-i", str(srv.identity),
           "-o", f"UserKnownHostsFile={srv.known_hosts}", "-o", "BatchMode=yes"]
    rows["scp -r"] = median_time(lambda i: _run([*scp, str(tree), f"{dest}:{work}/s{i}"]))

    def rsync_again(i: int) -> None:
        (tree / "dir01" / "file0001.bin").write_bytes(os.urandom(TOTAL // FILES))
        _run(["rsync", "-a", "-e", ssh, f"{tree}/", f"{dest}:{work}/r0/"])

    rows["rsync -a (1 file changed)"] = median_time(rsync_again)
    rows["one remote command (ssh host true)"] = median_time(lambda i: _run([*ssh_command(srv), dest, "true"]))
    return rows


def _upload_line(lines: list[str], run: int) -> str:
    """What gitpipe logged about the upload of run `run`: files sent, files linked, time."""
    sent = next(line for line in reversed(lines) if f"uploading release {run}-" in line)
    took = next(line for line in reversed(lines) if f"release {run}-" in line and "complete in" in line)
    return f"{sent.split(': ', 2)[2]}; upload step {took.rsplit(' ', 1)[1]}"


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)


if __name__ == "__main__":
    main()

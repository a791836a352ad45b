"""The seccomp filter every sandbox runs under: no kernel keyrings.

The kernel's keyrings are not behind any namespace bwrap makes. Every attempt inherited the
daemon's session keyring, and all of them run as the one build user, whose user keyring they
share: a key one run added (or only its description, which anyone of the same uid may view)
was there for any later run to read, a way from an untrusted branch's run into a protected
one's and back. As Docker's default profile does, add_key, request_key and keyctl fail with
EPERM inside the sandbox; nothing else is filtered.

The filter is a classic BPF program (what bwrap's `--seccomp FD` reads, as libseccomp's
seccomp_export_bpf writes it), for the system call tables a process on this host may use:
x86_64 (and its x32 numbers), i386, aarch64 and 32-bit arm. A process of another architecture
(none on these hosts) is let through: the filter cannot name its numbers.

bwrap reads the program from a file descriptor. Its command line carries `--seccomp` and a
placeholder holding the program (`PREFIX` + hex); whoever starts bwrap puts the program in a
pipe and the pipe's read end in its place (`opened` here, or the parked launcher's Perl)."""

from __future__ import annotations

import errno
import functools
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager

PREFIX = "gitpipe-seccomp:"  # + the program in hex: replaced by the fd it is read from

# struct seccomp_data: the syscall number at offset 0, the audit architecture at offset 4
_NR, _ARCH = 0, 4
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
_ALLOW = 0x7FFF0000  # SECCOMP_RET_ALLOW
_DENY = 0x00050000 | errno.EPERM  # SECCOMP_RET_ERRNO
_X32 = 0x40000000  # __X32_SYSCALL_BIT

# audit architecture -> (add_key, request_key, keyctl)
KEYRING_CALLS = {
    0xC000003E: (248, 249, 250, _X32 | 248, _X32 | 249, _X32 | 250),  # AUDIT_ARCH_X86_64, x32 too
    0x40000003: (286, 287, 288),  # AUDIT_ARCH_I386
    0xC00000B7: (217, 218, 219),  # AUDIT_ARCH_AARCH64
    0x40000028: (309, 310, 311),  # AUDIT_ARCH_ARM
}


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)  # struct sock_filter, host byte order


@functools.cache
def program() -> bytes:
    """The filter: for each known architecture, its keyring calls get EPERM; all else passes."""
    # load arch; per architecture: compare, load nr, one compare per call, allow; allow; deny
    deny = 1 + sum(2 + len(calls) + 1 for calls in KEYRING_CALLS.values()) + 1
    out = [_insn(_LD_W_ABS, 0, 0, _ARCH)]
    for arch, calls in KEYRING_CALLS.items():
        # equal: on to this architecture's checks; else past them (its load, its compares and
        # its allow) to the next architecture's compare
        out.append(_insn(_JEQ_K, 0, 1 + len(calls) + 1, arch))
        out.append(_insn(_LD_W_ABS, 0, 0, _NR))
        for nr in calls:  # a jump counts from the instruction after it
            out.append(_insn(_JEQ_K, deny - (len(out) + 1), 0, nr))
        out.append(_insn(_RET_K, 0, 0, _ALLOW))
    out.append(_insn(_RET_K, 0, 0, _ALLOW))  # an architecture not named: nothing to match
    assert len(out) == deny and deny < 256  # where the compares jump to; a jump is 8 bits
    out.append(_insn(_RET_K, 0, 0, _DENY))
    return b"".join(out)


def covers(machine: str) -> bool:
    """Whether the filter names this machine's own system call table (else it lets all through)."""
    return machine in ("x86_64", "aarch64", "i686", "i386") or machine.startswith("armv")


def options() -> list[str]:
    """bwrap's options for the filter (the placeholder: see `opened`)."""
    return ["--seccomp", PREFIX + program().hex()]


@contextmanager
def opened(argv: list[str]) -> Iterator[tuple[list[str], tuple[int, ...]]]:
    """`argv` with its placeholder (after `--seccomp`) replaced by a pipe's read end holding the
    program, and the fds to pass on (that one); closed when the block ends (once the process is
    started). `argv` as it is and no fd when it has no placeholder."""
    for i, arg in enumerate(argv):  # the first one only: bwrap's (what it runs comes after)
        if i and arg.startswith(PREFIX) and argv[i - 1] == "--seccomp":
            data = bytes.fromhex(arg[len(PREFIX):])
            read, write = os.pipe()
            try:
                try:
                    os.write(write, data)  # a few hundred bytes: within a pipe's buffer
                finally:
                    os.close(write)
                yield [*argv[:i], str(read), *argv[i + 1:]], (read,)
            finally:
                os.close(read)
            return
    yield argv, ()

"""Run a command under the seccomp filters systemd installs for the unit's options.

    python tests/sandbox.py [--allow SYSCALL ...] [--deny SYSCALL ...]
                            [--families AF_UNIX,AF_INET,...] [--mdwe] [--namespaces]
                            [--personality] [--suid] -- COMMAND ...

Used by tests/test_service.py, after it has dropped privileges with setpriv(1) and set up
the mount namespace: this is the part systemd does with libseccomp, reproduced here
with the same library (through ctypes) and the same rules as systemd's
src/shared/seccomp-util.c:

    SystemCallFilter=       --allow (an allow list; everything else fails with EPERM)
                            and --deny (names removed from it)
    MemoryDenyWriteExecute  --mdwe: mmap with PROT_WRITE|PROT_EXEC, mprotect and
                            pkey_mprotect adding PROT_EXEC, shmat with SHM_EXEC: EPERM
    RestrictAddressFamilies --families: socket() of any other family: EAFNOSUPPORT
    RestrictNamespaces=yes  --namespaces: unshare, setns, clone with a CLONE_NEW* flag:
                            EPERM; clone3 (whose flags a filter cannot read): ENOSYS
    LockPersonality=yes     --personality: personality() to anything but PER_LINUX: EPERM
    RestrictSUIDSGID=yes    --suid: chmod family setting S_ISUID/S_ISGID: EPERM

The filters are loaded into this process, which then replaces itself with COMMAND:
filters survive execve, as they do for a service.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import os
import socket
import sys

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_NE = 1
SCMP_CMP_EQ = 4
SCMP_CMP_MASKED_EQ = 7
PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000
S_ISUID_GID = 0o6000
NAMESPACE_FLAGS = (
    0x00020000,
    0x02000000,
    0x04000000,
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
    0x00000080,
)
PER_LINUX = 0


def act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


class Filter:
    def __init__(self, default: int) -> None:
        name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
        self.lib = ctypes.CDLL(name, use_errno=True)
        self.lib.seccomp_init.restype = ctypes.c_void_p
        self.lib.seccomp_init.argtypes = [ctypes.c_uint32]
        self.lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.POINTER(ArgCmp),
        ]
        self.lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        self.lib.seccomp_load.argtypes = [ctypes.c_void_p]
        self.lib.seccomp_release.argtypes = [ctypes.c_void_p]
        self.ctx = self.lib.seccomp_init(default)
        if not self.ctx:
            raise OSError("seccomp_init failed")

    def number(self, name: str) -> int | None:
        nr = self.lib.seccomp_syscall_resolve_name(name.encode())
        return None if nr < 0 else int(nr)

    def rule(self, action: int, name: str, *cmps: tuple[int, int, int, int]) -> None:
        nr = self.number(name)
        if nr is None:
            return  # not a system call of this architecture (systemd skips these too)
        array = (ArgCmp * max(1, len(cmps)))(*[ArgCmp(*c) for c in cmps])
        rc = self.lib.seccomp_rule_add_array(self.ctx, action, nr, len(cmps), array)
        if rc < 0:
            raise OSError(-rc, f"seccomp rule for {name}: {os.strerror(-rc)}")

    def load(self) -> None:
        rc = self.lib.seccomp_load(self.ctx)
        if rc < 0:
            raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")
        self.lib.seccomp_release(self.ctx)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--allow", nargs="*", default=None)
    parser.add_argument("--deny", nargs="*", default=[])
    parser.add_argument("--families", default="")
    parser.add_argument("--mdwe", action="store_true")
    parser.add_argument("--namespaces", action="store_true")
    parser.add_argument("--personality", action="store_true")
    parser.add_argument("--suid", action="store_true")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)

    # Each option is its own filter, as systemd loads them; the kernel applies the
    # strictest answer of all loaded filters. The allow list goes last: seccomp() itself
    # is not on it.
    if args.mdwe:
        f = Filter(SCMP_ACT_ALLOW)
        both = PROT_WRITE | PROT_EXEC
        f.rule(act_errno(errno.EPERM), "mmap", (2, SCMP_CMP_MASKED_EQ, both, both))
        for name in ("mprotect", "pkey_mprotect"):
            f.rule(act_errno(errno.EPERM), name, (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        f.rule(act_errno(errno.EPERM), "shmat", (2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
        f.load()
    if args.families:
        allowed = {int(getattr(socket, name)) for name in args.families.split(",")}
        f = Filter(SCMP_ACT_ALLOW)
        for family in range(0, 64):
            if family not in allowed:
                f.rule(act_errno(errno.EAFNOSUPPORT), "socket", (0, SCMP_CMP_EQ, family, 0))
        f.load()
    if args.namespaces:
        f = Filter(SCMP_ACT_ALLOW)
        f.rule(act_errno(errno.EPERM), "unshare")
        f.rule(act_errno(errno.EPERM), "setns")
        for flag in NAMESPACE_FLAGS:
            f.rule(act_errno(errno.EPERM), "clone", (0, SCMP_CMP_MASKED_EQ, flag, flag))
        f.rule(act_errno(errno.ENOSYS), "clone3")
        f.load()
    if args.personality:
        f = Filter(SCMP_ACT_ALLOW)
        f.rule(act_errno(errno.EPERM), "personality", (0, SCMP_CMP_NE, PER_LINUX, 0))
        f.load()
    if args.suid:
        f = Filter(SCMP_ACT_ALLOW)
        mask = (S_ISUID_GID, S_ISUID_GID)
        f.rule(act_errno(errno.EPERM), "chmod", (1, SCMP_CMP_MASKED_EQ, *mask))
        f.rule(act_errno(errno.EPERM), "fchmod", (1, SCMP_CMP_MASKED_EQ, *mask))
        f.rule(act_errno(errno.EPERM), "fchmodat", (2, SCMP_CMP_MASKED_EQ, *mask))
        f.load()
    if args.allow is not None:
        f = Filter(act_errno(errno.EPERM))
        for name in sorted(set(args.allow) - set(args.deny)):
            f.rule(SCMP_ACT_ALLOW, name)
        f.load()
    os.execvp(args.command[0], args.command)


if __name__ == "__main__":
    main(sys.argv[1:])

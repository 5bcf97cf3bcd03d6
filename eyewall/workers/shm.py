"""A shared memory segment for worker processes: a header, a lock, a table of worker
slots and fixed-size hash tables.  Pure standard library (mmap, fcntl); no event loop.

Layout (little-endian; every offset is fixed by the constants below, and the magic
names the layout's version)::

    0        magic (16 bytes), hash key (16 bytes), then u64 statistics
    4096     slot table: MAX_SLOTS x (pid u32, pad, start time u64, group u32, load u32)
    ...      tables, each TAGS then PAYLOADS (see `Table`)

The segment is a memfd (anonymous memory with a file descriptor): the supervisor
creates it, its workers inherit the descriptor, and a successor generation started by
``eyewall restart`` inherits it too, so the limits survive a restart.  Memory is fixed
at creation: tables never grow; a full set evicts by a rule each table chooses.

One lock guards everything: ``flock`` on an open file description of the segment's
own (opened through /proc/self/fd, so that processes sharing the inherited descriptor
still exclude each other; a POSIX record lock, ``lockf``, where /proc is missing).  The
kernel releases it when its holder dies, so a worker killed inside a critical section
cannot leave the others waiting forever (it may leave the entry it was writing
half-updated; the limits module orders its writes so that this can only under-count).
The event loop thread is the only one of a process that takes it.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import secrets
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

__all__ = ["MAX_SLOTS", "Segment", "Table", "TableSpec", "process_start"]

MAGIC = b"eyewall-limits\x00\x02"  # the last byte is the layout version
HEADER = 4096
MAX_SLOTS = 512  # worker slots, shared by the generations that overlap in a restart
SLOT = struct.Struct("<IxxxxQII")  # pid, process start time (clock ticks), group, load
LOAD = struct.Struct("<I")
TAG = 16  # bytes of an entry's identity: a keyed BLAKE2b digest of its key
WAYS = 8  # entries per set
EMPTY = bytes(TAG)
STATS = struct.Struct("<16Q")  # counters at offset 32: see Segment.stat
MEMBERSHIP = 15  # the statistics counter bumped whenever a slot's group changes


@dataclass(frozen=True)
class TableSpec:
    """A table's shape: ``sets`` (a power of two) of `WAYS` entries, each a tag and a
    payload of ``payload`` format (`struct`)."""

    name: str
    sets: int
    payload: str

    @property
    def size(self) -> int:
        """Bytes the table takes in the segment."""
        return self.sets * WAYS * (TAG + struct.calcsize(self.payload))


class Table:
    """A set-associative hash table in the segment: ``find`` and ``claim`` look at the
    `WAYS` entries of one set only, so every operation has a fixed cost.  Entries are
    numbered; ``payload`` reads and writes the payload of one.  Call with the lock
    held."""

    def __init__(self, mm: mmap.mmap, offset: int, spec: TableSpec) -> None:
        self.mm = mm
        self.spec = spec
        self.sets = spec.sets
        self.mask = spec.sets - 1
        self.tags = offset
        self.record = struct.Struct(spec.payload)
        self.payloads = offset + spec.sets * WAYS * TAG
        self.capacity = spec.sets * WAYS

    def set_of(self, tag: bytes) -> int:
        """The index of the set where ``tag`` lives."""
        return int.from_bytes(tag[:8], "little") & self.mask

    def find(self, tag: bytes, set_index: int) -> int:
        """The entry holding ``tag`` in its set, or -1."""
        start = self.tags + set_index * WAYS * TAG
        end = start + WAYS * TAG
        mm = self.mm
        pos = mm.find(tag, start, end)
        while pos != -1 and (pos - start) % TAG:
            pos = mm.find(tag, pos + 1, end)
        return -1 if pos == -1 else set_index * WAYS + (pos - start) // TAG

    def claim(self, tag: bytes, set_index: int, evict: Callable[[int], int] | None = None) -> int:
        """An entry for ``tag`` in its set: an empty one, else the one ``evict(set)``
        chooses to give up, else -1 (the set is full).  The tag is written; the payload
        is the caller's to write."""
        index = self.find(EMPTY, set_index)
        if index == -1 and evict is not None:
            index = evict(set_index)
        if index != -1:
            self.mm[self.tags + index * TAG : self.tags + (index + 1) * TAG] = tag
        return index

    def entries_of_set(self, set_index: int) -> range:
        """The entry numbers of one set."""
        return range(set_index * WAYS, (set_index + 1) * WAYS)

    def tag(self, index: int) -> bytes:
        """The tag of entry ``index`` (`EMPTY` when unused)."""
        return self.mm[self.tags + index * TAG : self.tags + (index + 1) * TAG]

    def read(self, index: int) -> tuple[Any, ...]:
        """The payload of entry ``index``, unpacked by the table's format."""
        return self.record.unpack_from(self.mm, self.payloads + index * self.record.size)

    def write(self, index: int, *values: object) -> None:
        """Write the payload of entry ``index`` (``values`` as the format says)."""
        self.record.pack_into(self.mm, self.payloads + index * self.record.size, *values)

    def clear(self, index: int) -> None:
        """Forget an entry (its tag first: a reader never sees a stale payload as
        someone else's)."""
        self.mm[self.tags + index * TAG : self.tags + (index + 1) * TAG] = EMPTY

    def used(self) -> Iterator[int]:
        """Every entry in use (a full scan: for reaping and tests, not for requests)."""
        mm, tags = self.mm, self.tags
        for index in range(self.capacity):
            if mm[tags + index * TAG : tags + (index + 1) * TAG] != EMPTY:
                yield index


class Segment:
    """The shared memory: ``tables`` by name, the lock, the slot table and a few
    statistics counters.  Create it with `create` (the supervisor) or `attach` (a
    worker, a successor) from its descriptor; raises OSError, or ValueError for a
    descriptor that is not such a segment or has another layout."""

    def __init__(self, fd: int, specs: tuple[TableSpec, ...], *, new: bool) -> None:
        self.fd = fd
        # lock() and unlock() take and give back the lock: C calls, no Python frame.
        self.lock: Callable[[], None]
        self.unlock: Callable[[], None]
        try:  # a description of our own: flock excludes other holders of the fd
            self.lock_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
            self.lock = partial(fcntl.flock, self.lock_fd, fcntl.LOCK_EX)
            self.unlock = partial(fcntl.flock, self.lock_fd, fcntl.LOCK_UN)
        except OSError:
            self.lock_fd = -1
            self.lock = partial(fcntl.lockf, fd, fcntl.LOCK_EX)
            self.unlock = partial(fcntl.lockf, fd, fcntl.LOCK_UN)
        self.specs = specs
        self.size = HEADER + _slots_size() + sum(s.size for s in specs)
        if new:
            os.ftruncate(fd, self.size)
        elif os.fstat(fd).st_size != self.size:
            raise ValueError("shared memory segment has another layout")
        self.mm = mmap.mmap(fd, self.size)
        if new:
            self.mm[: len(MAGIC)] = MAGIC
            self.mm[16:32] = secrets.token_bytes(16)
        elif self.mm[: len(MAGIC)] != MAGIC:
            raise ValueError("not an eyewall shared memory segment (or another version)")
        self.hash_key = bytes(self.mm[16:32])
        offset = HEADER + _slots_size()
        self.tables: dict[str, Table] = {}
        for spec in specs:
            self.tables[spec.name] = Table(self.mm, offset, spec)
            offset += spec.size

    @classmethod
    def create(cls, specs: tuple[TableSpec, ...]) -> Segment:
        """A new zeroed segment on a new memfd (close-on-exec: pass it on explicitly)."""
        return cls(os.memfd_create("eyewall-limits", os.MFD_CLOEXEC), specs, new=True)

    @classmethod
    def attach(cls, fd: int, specs: tuple[TableSpec, ...]) -> Segment:
        """The segment behind an inherited descriptor ``fd``, laid out by ``specs``.
        Raises OSError, or ValueError for another layout."""
        return cls(fd, specs, new=False)

    def close(self) -> None:
        """Unmap the segment and close its descriptor (others keep theirs)."""
        self.mm.close()
        if self.lock_fd != -1:
            os.close(self.lock_fd)
        os.close(self.fd)

    # -- the lock ------------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the segment's lock for the ``with`` block."""
        self.lock()
        try:
            yield
        finally:
            self.unlock()

    # -- keys ----------------------------------------------------------------------

    def digest(self, key: bytes) -> bytes:
        """An entry's tag: keyed BLAKE2b, so nobody outside can aim keys at one set
        (the key is random per segment).  Never the empty tag."""
        tag = hashlib.blake2b(key, digest_size=TAG, key=self.hash_key).digest()
        return tag if tag != EMPTY else b"\x01" + tag[1:]

    # -- statistics (with the lock held) ------------------------------------------------

    def stat(self, index: int) -> int:
        """Statistics counter ``index`` (0-15)."""
        return int(struct.unpack_from("<Q", self.mm, 32 + 8 * index)[0])

    def bump(self, index: int, by: int = 1) -> None:
        """Add ``by`` to statistics counter ``index``."""
        struct.pack_into("<Q", self.mm, 32 + 8 * index, self.stat(index) + by)

    # -- slots ---------------------------------------------------------------------------

    def slot(self, index: int) -> tuple[int, int, int]:
        """(pid, start time, group) of a slot; pid 0 is a free slot, group 0 a worker
        not accepting connections (yet, or any more)."""
        pid, start, group, _ = SLOT.unpack_from(self.mm, HEADER + index * SLOT.size)
        return int(pid), int(start), int(group)

    def set_slot(self, index: int, pid: int, start: int, group: int = 0) -> None:
        """Record slot ``index`` as ``pid``'s (started at ``start``, `process_start`), or
        free it (pid 0); its load starts at 0.  With the lock held."""
        SLOT.pack_into(self.mm, HEADER + index * SLOT.size, pid, start, group, 0)
        self.bump(MEMBERSHIP)

    def set_group(self, index: int, group: int) -> None:
        """Say the worker in slot ``index`` accepts connections with the others of
        ``group`` (its supervisor's pid), or no longer does (0)."""
        with self.locked():
            LOAD.pack_into(self.mm, HEADER + index * SLOT.size + 16, group)
            self.bump(MEMBERSHIP)

    def membership(self) -> int:
        """A number that changes whenever a worker joins or leaves a group (read
        without the lock: compare it, then look at the slots)."""
        return self.stat(MEMBERSHIP)

    def set_load(self, index: int, load: int) -> None:
        """Publish the open connections of the worker in slot ``index``.  No lock: one
        aligned 4-byte write, read by others as a hint."""
        LOAD.pack_into(self.mm, HEADER + index * SLOT.size + 20, load)

    def load(self, index: int) -> int:
        """The open connections the worker in slot ``index`` last published."""
        return int(LOAD.unpack_from(self.mm, HEADER + index * SLOT.size + 20)[0])

    def free_slot(self) -> int:
        """A free slot's index, or -1 (with the lock held)."""
        for index in range(MAX_SLOTS):
            if self.slot(index)[0] == 0:
                return index
        return -1


def _slots_size() -> int:
    size = MAX_SLOTS * SLOT.size
    return (size + 4095) // 4096 * 4096


def process_start(pid: int) -> int:
    """When ``pid`` started (clock ticks since boot, /proc/PID/stat field 22), or 0 if
    no such process: a pid and its start time name a process even after the pid is
    reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    fields = stat.rpartition(b")")[2].split()
    if len(fields) < 20 or fields[0] == b"Z":  # a zombie has exited: not running
        return 0
    return int(fields[19])

"""Loading addon files, calling their hooks, reloading them when they change.

An exception in a hook is logged with the addon's name and the file's line, and traffic
goes on — unless the addon was loaded as a policy addon, in which case the exchange
fails closed (`AddonFailed`, answered 502).  An ``async`` hook that runs past
``hook_timeout`` seconds is cancelled and counts as such an exception.  Code that runs
on the event loop itself — a file's top level, its classes' ``__init__``, lifecycle
hooks, plain hooks — is stopped after ``hook_timeout`` seconds by a timer signal
(`bounded`), so an endless loop in an addon fails the addon, not the proxy.  A method
whose name is a near miss of a hook's is refused when the file loads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import inspect
import logging
import math
import os
import signal
import stat
import sys
import threading
import time
import types
from collections.abc import Callable, Coroutine, Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from eyewall.addons.hooks import DATA_HOOKS, HOOKS, Configure, Done, Hook, Load, Running
from eyewall.observe.records import redact_url

__all__ = [
    "AddonFailed",
    "Addons",
    "Driven",
    "Loader",
    "Overran",
    "bounded",
    "stepwise",
    "unsafe_code",
]

log = logging.getLogger("eyewall.addons")

_HOOK_NAMES = frozenset(HOOKS)
_DATA_NAMES = tuple(h.name for h in DATA_HOOKS)
BLOCKING = 0.1  # seconds a plain hook may hold the event loop before it is reported
CANCEL_GRACE = 1.0  # seconds a cancelled async hook has to clean up before it is abandoned
TRACEBACK_EVERY = 60.0  # seconds between two tracebacks of the same addon's failing hook


# What addon code may raise and the proxy survives: every exception, and the two that
# end a program (sys.exit, an interrupt) — an addon is not the program.  Cancellation
# (the proxy's own, or a hook's timeout) goes through.
USER_ERRORS = (Exception, SystemExit, KeyboardInterrupt)


class Overran(BaseException):
    """Raised inside addon code that ran on the event loop past its limit (`bounded`).
    A BaseException, as KeyboardInterrupt is: a retry loop's ``except Exception``
    does not swallow it."""


OVERRAN_AGAIN = 0.5  # seconds between `Overran` raised in code that caught the last one
GIVE_UP = 1.0  # seconds, at least, addon code may go on ignoring `Overran` (as long as
# it was allowed to run, if longer) before the process exits
EXIT_WEDGED = 70  # the exit status then (EX_SOFTWARE): the service manager restarts it
_MAIN_THREAD = threading.main_thread().ident
_armed = False  # whether a SIGALRM now means: stop the addon code running
_first_stop: float | None = None  # when the running addon code was first told to stop
_give_up = GIVE_UP  # the running addon code's: max(GIVE_UP, its limit)


def _overran(signum: int, frame: object) -> None:
    global _first_stop
    if not _armed:
        return
    now = time.monotonic()
    if _first_stop is None:
        _first_stop = now
    elif now - _first_stop >= _give_up:
        # It catches everything (a bare ``except:`` in a loop): nothing in this process
        # can run again, a stop signal included.  Better restarted than wedged.
        os.write(
            2,
            b"eyewall: addon code has ignored being stopped for %.1f s (a bare except: in a"
            b" loop?); nothing else can run: exiting with status %d\n"
            % (now - _first_stop, EXIT_WEDGED),
        )
        os._exit(EXIT_WEDGED)
    raise Overran


_owned = False  # whether SIGALRM's handler was `_overran` when last looked at


def _take_alarm() -> bool:
    """Whether SIGALRM is `bounded`'s: taken when nobody has it (main thread only),
    given up for good to addon code that set its own handler (``signal.getsignal`` is
    slow, so this looks only on first use and after addon code loads)."""
    global _owned
    handler = signal.getsignal(signal.SIGALRM)
    if handler is signal.SIG_DFL:
        signal.signal(signal.SIGALRM, _overran)
        handler = _overran
    _owned = handler is _overran
    return _owned


class bounded:  # used as a function: ``with bounded(seconds):``
    """Run the body (synchronous addon code) for at most ``seconds``: past that, a
    timer signal (SIGALRM, ``setitimer(ITIMER_REAL)``) raises `Overran` in the Python
    code running, or in a call Python interrupts on a signal (``time.sleep``, socket
    I/O), and again every `OVERRAN_AGAIN` seconds while the code goes on (it may catch
    the first).  A call that does not return to Python (a C extension computing,
    ``os.system``) is stopped only once it does.  Unbounded outside the main thread, or
    when something else owns SIGALRM.  Not reentrant."""

    __slots__ = ("armed", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.armed = False

    def __enter__(self) -> None:
        global _armed
        seconds = self.seconds
        if not 0 < seconds < math.inf or threading.get_ident() != _MAIN_THREAD:
            return
        if not _owned and not _take_alarm():
            return  # someone else's
        global _first_stop, _give_up
        _first_stop, _give_up = None, max(GIVE_UP, seconds)
        _armed = self.armed = True
        signal.setitimer(signal.ITIMER_REAL, seconds, OVERRAN_AGAIN)

    def __exit__(self, *exc: object) -> None:
        global _armed
        if self.armed:
            _armed = self.armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)


class Driven:
    """A hook coroutine that `stepwise` drives: once ``abandoned``, it is dropped at its
    next step instead of resumed (it ignored its cancellation)."""

    __slots__ = ("abandoned", "longest")

    def __init__(self) -> None:
        self.abandoned = False
        self.longest = 0.0  # seconds: its longest step (the event loop held that long)


@types.coroutine
def stepwise(
    coro: Coroutine[Any, Any, Any] | Generator[Any, Any, Any],
    seconds: float,
    driven: Driven | None = None,
) -> Generator[Any, Any, Any]:
    """Await ``coro`` (a coroutine, or any awaitable's ``__await__`` iterator) with
    each of its steps — the code between two of its awaits, which runs on the event
    loop and holds every connection — `bounded` by ``seconds``: an
    ``async`` hook that blocks (a synchronous HTTP call, ``time.sleep``) is stopped
    like a plain one.  The awaits themselves are the caller's to bound.  Delegates
    sends, throws (cancellation) and close as ``yield from`` does (PEP 380), until
    ``driven`` is abandoned: then the coroutine is dropped (its finalizer closes it)
    and CancelledError raised."""
    value: Any = None
    error: BaseException | None = None
    while True:
        if driven is not None and driven.abandoned:
            # Not closed here: dropped, so that it is finalized (closed) once, now,
            # while the event loop runs: closing a coroutine that ignores GeneratorExit
            # leaves it alive, to be finalized later, maybe when no loop runs.
            del coro
            error = value = None  # nothing here may keep the hook's frames alive
            raise asyncio.CancelledError()
        started = time.monotonic()
        try:
            with bounded(seconds):
                sent = coro.send(value) if error is None else coro.throw(error)
        except StopIteration as stop:
            return stop.value
        finally:
            if driven is not None:
                driven.longest = max(driven.longest, time.monotonic() - started)
        try:
            value, error = (yield sent), None
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as e:  # cancellation, and whatever else is thrown in
            value, error = None, e


def _request_named(hook: Hook) -> str:
    """``request ID METHOD URL`` for a hook about a flow, for log lines (the URL
    redacted as in the access log, and cut short); "" for another hook."""
    flow = getattr(hook, "flow", None)
    record = getattr(flow, "record", None)
    if record is None:
        return "its request"
    url = redact_url(record.url)
    if len(url) > 200:
        url = url[:200] + "..."
    return f"request {record.id} ({record.method} {url})"


def _steps_of(awaitable: Any) -> Coroutine[Any, Any, Any] | Generator[Any, Any, Any]:
    """What `stepwise` drives for a hook's ``awaitable``: a coroutine itself, anything
    else (a future, an object with ``__await__``) through its iterator."""
    if inspect.iscoroutine(awaitable):
        return awaitable
    steps: Generator[Any, Any, Any] = awaitable.__await__()
    return steps


def _abandon(task: asyncio.Future[Any], driven: Driven) -> None:
    if not task.done():
        driven.abandoned = True
        task.cancel()  # wakes it, whatever it awaits: `stepwise` then closes the hook


class AddonFailed(Exception):
    """A policy addon's hook raised (or timed out): the exchange fails closed."""

    def __init__(self, addon: str, hook: str, why: str = "failed") -> None:
        super().__init__(f"addon {addon} {why} in {hook}")
        self.addon = addon
        self.hook = hook


@dataclass
class Loader:
    """Given to ``load``: what an addon may want to know about itself."""

    path: Path
    log: logging.Logger


@dataclass
class Addon:
    """One addon instance: its ``name``, the object whose methods are hooks, and whether it came
    from a policy file (reloaded with the config) or the command line."""

    name: str
    instance: Any
    policy: bool


@dataclass
class AddonFile:
    """A loaded addon script: its path, its modification time when loaded (to notice edits) and
    the addons it defined."""

    path: Path
    policy: bool
    stamp: tuple[int, ...] = ()  # `read_code`'s stamp of the loaded version
    addons: list[Addon] = field(default_factory=list)


def unsafe_code(path: str | Path) -> str | None:
    """Why a code file must not be loaded, or None (as ssh's StrictModes refuses keys):
    the file is writable by group or others or owned by another user than this one
    (root excepted), or a directory on its way — as given or with symlinks resolved —
    lets someone else replace it (owned by another user, or writable by group or others
    without the sticky bit)."""
    try:
        info = os.stat(path)
    except OSError as e:
        return f"cannot read {path}: {e.strerror}"
    return _unsafe_owner_or_mode(info, Path(path)) or _unsafe_directories(Path(path))


def _unsafe_owner_or_mode(info: os.stat_result, path: Path) -> str | None:
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (chmod go-w {path})"
    if info.st_uid not in (os.getuid(), 0):
        return f"{path} belongs to another user (uid {info.st_uid})"
    return None


def _unsafe_directories(path: Path) -> str | None:
    seen: set[Path] = set()
    for directory in (*Path(os.path.abspath(path)).parents, *path.resolve().parents):
        if directory in seen:
            continue
        seen.add(directory)
        try:
            info = os.stat(directory)
        except OSError as e:
            return f"cannot read directory {directory}: {e.strerror}"
        if info.st_uid not in (os.getuid(), 0):
            return f"directory {directory} belongs to another user (uid {info.st_uid})"
        writable = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and not info.st_mode & stat.S_ISVTX:
            return (
                f"directory {directory} is writable by group or others, who could replace"
                f" {path.name} (chmod go-w {directory})"
            )
    return None


def read_code(path: Path) -> tuple[bytes, tuple[int, ...]]:
    """The source of a code file and its stamp (what changes when the file is edited,
    replaced or its mode or owner changed), checked on the opened file itself so it
    cannot be swapped between check and read.  Raises PermissionError with the
    reason for an unsafe file (`unsafe_code`), OSError when it cannot be read."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        problem = _unsafe_owner_or_mode(info, path) or _unsafe_directories(path)
        if problem is not None:
            raise PermissionError(problem)
        source = f.read()
    return source, _stamp(info)


def _stamp(info: os.stat_result) -> tuple[int, ...]:
    return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _line_of(error: BaseException, path: Path) -> str:
    """ " (line N)": the last line of ``path`` in ``error``'s traceback (or the line of a
    SyntaxError in it); "" when it has none."""
    if isinstance(error, SyntaxError) and error.filename == str(path) and error.lineno:
        return f" (line {error.lineno})"
    line = None
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == str(path):
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" (line {line})" if line is not None else ""


def _near_misses(cls: type) -> list[tuple[str, str]]:
    """(method, hook) pairs where a public method's name is close to a hook's."""
    out = []
    for name in dir(cls):
        if name.startswith("_") or name in _HOOK_NAMES:
            continue
        if not callable(getattr(cls, name, None)):
            continue
        near = difflib.get_close_matches(name.lower(), _HOOK_NAMES, n=1, cutoff=0.8)
        if near:
            out.append((name, near[0]))
    return out


def _unsaid(*args: Any, **kwargs: Any) -> None:
    pass


def _signature_problems(instance: Any) -> list[str]:
    """The hook methods of ``instance`` that cannot take the hook's arguments (every
    call would fail): ``Class.hook must take ...``."""
    problems = []
    for name, hook in HOOKS.items():
        method = getattr(instance, name, None)
        if not callable(method):
            continue
        wanted = [f.name for f in dataclasses.fields(hook)]
        try:
            inspect.signature(method).bind(*wanted)
        except TypeError:
            takes = f"({', '.join(wanted)})" if wanted else "no argument"
            problems.append(f"{type(instance).__name__}.{name} must take {takes} besides self")
        except ValueError:  # no signature to read (a builtin): it will tell when called
            continue
    return problems


def _instances(module: ModuleType) -> list[Any]:
    listed = getattr(module, "addons", None)
    if listed is not None:
        return list(listed)
    out = []
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ == module.__name__ and _HOOK_NAMES & set(dir(cls)):
            out.append(cls())
    return out


class Addons:
    """The loaded addons of ``observed`` and ``policy`` files, indexed by hook."""

    def __init__(
        self,
        observed: Iterable[str] = (),
        policy: Iterable[str] = (),
        hook_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hook_timeout = hook_timeout
        self.clock = clock  # seconds; tests inject their own
        self.files = [AddonFile(Path(p), False) for p in observed]
        self.files += [AddonFile(Path(p), True) for p in policy]
        self._by_hook: dict[str, list[Addon]] = {}
        self._loaded = 0
        self._blocking_reported: dict[str, float] = {}  # addon name -> when last logged
        self._traceback_logged: dict[tuple[str, str], float] = {}  # (addon, hook) -> when
        # (addon, hook, "timeout" or "error") -> hooks that failed so, since start
        self.failures: dict[tuple[str, str, str], int] = {}

    def load_all(self) -> None:
        """Load every file; a file that fails is a start-up error (ValueError, for the
        caller to report: not logged here)."""
        # SIGALRM as the process got it (ignored by its parent, say); a file that takes
        # it while loading is named by `_read`, so each cause is said once.
        if self.files and threading.get_ident() == _MAIN_THREAD and not _take_alarm():
            log.warning(
                "SIGALRM is ignored or taken by other code: addon code running on the"
                " event loop is not stopped after timeouts.addon_hook"
            )
        for f in self.files:
            error = self._load(f, report=False)
            if error:
                raise ValueError(error)
        self._index()

    def check(self) -> list[str]:
        """The errors `load_all` would raise, every file's, without starting any addon:
        each file is read and run as at start-up (its top level executes) and its
        classes checked, but no lifecycle hook is called (for ``check-config``)."""
        errors = []
        for f in self.files:
            found = self._read(f, report=False)  # the errors are the answer, not log lines
            if isinstance(found, str):
                errors.append(found)
        return errors

    def _load(self, f: AddonFile, report: bool = True) -> str | None:
        """(Re)load one file; returns an error message, keeping the old version."""
        instances = self._read(f, report)
        if isinstance(instances, str):
            return instances
        for old in f.addons:
            self._lifecycle(old, Done())
        f.addons = [Addon(f"{f.path.stem}.{type(i).__name__}", i, f.policy) for i in instances]
        for addon in f.addons:
            self._lifecycle(addon, Load(Loader(f.path, logging.getLogger(f"addon.{addon.name}"))))
        return None

    def _read(self, f: AddonFile, report: bool = True) -> list[Any] | str:
        """Run one file and check its classes: their instances, or an error message
        (logged if ``report``).  Notes the file's stamp when it loads."""
        say = log.error if report else _unsaid
        try:
            source, stamp = read_code(f.path)
        except PermissionError as e:
            say("addon refused: %s", e)
            return f"addon refused: {e}"
        except OSError as e:
            say("addon %s cannot be read: %s", f.path, e.strerror)
            return f"addon {f.path} cannot be read: {e.strerror}"
        try:
            # Compiled from the source just checked, never through the import system:
            # no bytecode cache is read (or written) that someone else could plant.
            code = compile(source, str(f.path), "exec", dont_inherit=True)
            self._loaded += 1
            name = f"eyewall_addon_{self._loaded}_{f.path.stem}"
            module = ModuleType(name)
            module.__file__ = str(f.path)
            sys.modules[name] = module
            with bounded(self.hook_timeout):
                exec(code, module.__dict__)
                instances = _instances(module)
            if threading.get_ident() == _MAIN_THREAD and _owned and not _take_alarm():
                log.warning(
                    "addon %s set its own SIGALRM handler: addon code is no longer stopped"
                    " after timeouts.addon_hook",
                    f.path,
                )
        except Overran as e:
            error = (
                f"addon {f.path} did not finish loading{_line_of(e, f.path)} within"
                f" timeouts.addon_hook ({self.hook_timeout:g} s)"
            )
            say("%s", error)
            return error
        except USER_ERRORS as e:  # any error in user code must be reported, never raised
            say(
                "addon %s failed to load: %s: %s",
                f.path,
                e.__class__.__name__,
                e,
                exc_info=not isinstance(e, OSError),
            )
            return (
                f"addon {f.path} failed to load{_line_of(e, f.path)}: {e.__class__.__name__}: {e}"
            )
        # a misspelt hook is an error, in a class with other hooks or with none
        classes = [type(i) for i in instances] or [
            cls
            for _, cls in inspect.getmembers(module, inspect.isclass)
            if cls.__module__ == module.__name__
        ]
        wrong = [
            f"{cls.__name__}.{method} is not a hook; did you mean {hook}? (a helper's"
            " name starts with _)"
            for cls in classes
            for method, hook in _near_misses(cls)
        ]
        wrong += [problem for instance in instances for problem in _signature_problems(instance)]
        listed = getattr(module, "addons", None) is not None  # the module's own list
        for i, instance in enumerate(instances if listed else ()):  # may hold anything
            if not any(callable(getattr(instance, name, None)) for name in _HOOK_NAMES):
                plain = instance is None or isinstance(instance, str | int | float | bool)
                shown = f"{instance!r:.40}" if plain else f"a {type(instance).__name__} object"
                wrong.append(f"addons[{i}] ({shown}) has no hook method")
        if wrong:
            error = f"addon {f.path}: {'; '.join(wrong)} (see docs/hooks.md)"
            say("%s", error)
            return error
        if not instances:
            return f"addon {f.path}: no class with a hook method (see docs/hooks.md)"
        f.stamp = stamp
        return instances

    def _index(self) -> None:
        by_hook: dict[str, list[Addon]] = {}
        for f in self.files:
            for addon in f.addons:
                for hook in _DATA_NAMES:
                    if callable(getattr(addon.instance, hook, None)):
                        by_hook.setdefault(hook, []).append(addon)
        self._by_hook = by_hook

    @property
    def enabled(self) -> bool:
        """Whether any addon implements any hook (when not, the data path skips the hook
        machinery)."""
        return bool(self._by_hook)

    def has(self, hook: type[Hook]) -> bool:
        """Whether any addon implements ``hook``."""
        return hook.name in self._by_hook

    def _lifecycle(self, addon: Addon, hook: Hook) -> None:
        method = getattr(addon.instance, hook.name, None)
        if method is None:
            return
        try:
            with bounded(self.hook_timeout):
                result = method(*hook.args())
            if inspect.isawaitable(result):
                log.warning("addon %s: lifecycle hook %s must not be async", addon.name, hook.name)
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except Overran:
            log.error(
                "addon %s: %s took longer than timeouts.addon_hook (%g s); stopped",
                addon.name,
                hook.name,
                self.hook_timeout,
            )
            self._failed(addon, hook.name, "timeout")
        except USER_ERRORS:
            log.exception("addon %s failed in %s", addon.name, hook.name)
            self._failed(addon, hook.name, "error")

    def lifecycle(self, hook: Hook) -> None:
        """Call a lifecycle hook (``load``, ``configure``, ``running``, ``done``) of
        every addon; an exception is logged, never raised."""
        for f in self.files:
            for addon in f.addons:
                self._lifecycle(addon, hook)

    async def call(self, hook: Hook) -> None:
        """Run ``hook`` on every addon that implements it, in load order.  Raises
        AddonFailed when a policy addon's hook raises or times out."""
        name = hook.name
        if name in self._by_hook:  # failures name the request (its id is on error pages)
            name_in_log = f"{name} of {_request_named(hook)}"
        for addon in self._by_hook.get(name, ()):
            try:
                started = self.clock()
                with bounded(self.hook_timeout):
                    result = getattr(addon.instance, name)(*hook.args())
                if inspect.isawaitable(result):
                    # No frame here may keep the hook alive once it is abandoned (its
                    # finalizer must run while the loop does): the task holds it.
                    driven = Driven()
                    task = asyncio.ensure_future(
                        stepwise(_steps_of(result), self.hook_timeout, driven)
                    )
                    result = None
                    await self._drive(addon, name, task, driven)
                    self._report_blocking(addon, name, driven.longest, True)
                else:
                    self._check_blocking(addon, name, self.clock() - started)
            except (TimeoutError, Overran) as e:
                log.error(
                    "addon %s: %s took longer than timeouts.addon_hook (%g s); %s",
                    addon.name,
                    name_in_log,
                    self.hook_timeout,
                    "stopped" if isinstance(e, Overran) else "cancelled",
                )
                self._failed(addon, name, "timeout")
                if addon.policy:
                    raise AddonFailed(addon.name, name, "timed out") from None
            except USER_ERRORS as e:
                self._log_failure(addon, name, e, name_in_log)
                self._failed(addon, name, "error")
                if addon.policy:
                    raise AddonFailed(addon.name, name) from None

    async def _drive(
        self, addon: Addon, hook: str, task: asyncio.Future[Any], driven: Driven
    ) -> None:
        """Wait for an async hook running as its own ``task`` (`stepwise`) at most
        ``hook_timeout`` seconds; then cancel it and give it `CANCEL_GRACE` seconds to
        clean up.  A hook that ignores its cancellation is abandoned (dropped at its
        next step) and the exchange goes on.  Raises what the hook raised, or
        TimeoutError."""
        try:
            done, _ = await asyncio.wait((task,), timeout=self.hook_timeout)
        except asyncio.CancelledError:  # the exchange itself was cancelled
            task.cancel()
            asyncio.get_running_loop().call_later(CANCEL_GRACE, _abandon, task, driven)
            raise
        if done:
            task.result()
            return
        task.cancel()
        done, _ = await asyncio.wait((task,), timeout=CANCEL_GRACE)
        if not done:
            log.error(
                "addon %s: %s ignored its cancellation for %g s; abandoned",
                addon.name,
                hook,
                CANCEL_GRACE,
            )
            _abandon(task, driven)
        raise TimeoutError

    def _log_failure(
        self, addon: Addon, hook: str, error: BaseException, where: str | None = None
    ) -> None:
        """One line per failure, with the traceback at most once a minute per addon and
        hook: a hook failing on every request must not bury the log.  ``where``: the
        hook as the line names it (with its request)."""
        now = self.clock()
        key = (addon.name, hook)
        if now - self._traceback_logged.get(key, -math.inf) >= TRACEBACK_EVERY:
            self._traceback_logged[key] = now
            log.error("addon %s failed in %s", addon.name, where or hook, exc_info=error)
        else:
            log.error(
                "addon %s failed in %s: %s: %s (traceback shown at most once a minute)",
                addon.name,
                where or hook,
                type(error).__name__,
                error,
            )

    def _failed(self, addon: Addon, hook: str, reason: str) -> None:
        key = (addon.name, hook, reason)
        self.failures[key] = self.failures.get(key, 0) + 1

    def _check_blocking(self, addon: Addon, hook: str, seconds: float) -> None:
        """A plain (not ``async``) hook runs on the event loop: while it runs, every
        connection waits.  Say so when it took longer than BLOCKING seconds (at most once
        a minute per addon); longer than the hook timeout, it counts as a timed-out hook
        (raises TimeoutError) — it cannot be cancelled, only reported."""
        if seconds > self.hook_timeout:
            raise TimeoutError
        self._report_blocking(addon, hook, seconds, False)

    def _report_blocking(self, addon: Addon, hook: str, seconds: float, awaited: bool) -> None:
        """Say that ``hook`` held the event loop ``seconds`` (all at once, or between two
        of its awaits when ``awaited``) if that is more than BLOCKING, at most once a
        minute per addon."""
        if seconds <= BLOCKING:
            return
        now = self.clock()
        if now - self._blocking_reported.get(addon.name, -math.inf) < 60:
            return
        self._blocking_reported[addon.name] = now
        log.warning(
            "addon %s: %s blocked the event loop for %.2f s%s (every connection waited);"
            " %s (said at most once a minute per addon)",
            addon.name,
            hook,
            seconds,
            " between two awaits" if awaited else "",
            "await slow work: an async client, or loop.run_in_executor() for a blocking call"
            if awaited
            else "make it an async hook that awaits slow work, or faster",
        )

    def reload_changed(self, settings: Any) -> None:
        """Reload the files that changed — edited, replaced, or their mode or owner
        changed (so a file refused as unsafe loads once fixed); a failed one keeps its
        old version and logs why, once."""
        changed = False
        for f in self.files:
            try:
                stamp = _stamp(os.stat(f.path))
            except OSError as e:
                if f.stamp:  # said once: the stamp is forgotten until the file is back
                    f.stamp = ()
                    log.warning(
                        "addon %s: %s; the version loaded before keeps running (remove it"
                        " from the addon settings and reload to stop it)",
                        f.path,
                        e.strerror or e,
                    )
                continue
            if stamp == f.stamp:
                continue
            if self._load(f) is None:
                changed = True
                log.info("addon %s reloaded", f.path)
                for addon in f.addons:
                    self._lifecycle(addon, Configure(settings))
                    self._lifecycle(addon, Running())
            else:
                f.stamp = stamp  # report a broken file once, not every second
                if f.addons:
                    log.warning("addon %s: the version loaded before keeps running", f.path)
        if changed:
            self._index()

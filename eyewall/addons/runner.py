"""Loading addon files, calling their hooks, reloading them when they change.

An exception in a hook is logged with the addon's name and the file's line, and traffic
goes on — unless the addon was loaded as a policy addon, in which case the exchange
fails closed (`AddonFailed`, answered 502).  An ``async`` hook that runs past
``hook_timeout`` seconds is cancelled and counts as such an exception.  A method whose
name is a near miss of a hook's is refused when the file loads.
"""

from __future__ import annotations

import asyncio
import difflib
import importlib.util
import inspect
import logging
import os
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from eyewall.addons.hooks import DATA_HOOKS, HOOKS, Configure, Done, Hook, Load, Running

__all__ = ["AddonFailed", "Addons", "Loader", "unsafe_code"]

log = logging.getLogger("eyewall.addons")

_HOOK_NAMES = frozenset(HOOKS)
_DATA_NAMES = tuple(h.name for h in DATA_HOOKS)


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
    mtime: float = 0.0
    addons: list[Addon] = field(default_factory=list)


def unsafe_code(path: str | Path) -> str | None:
    """Why a code file must not be loaded, or None: writable by group or others, or
    owned by another user than this one (root excepted) — as ssh refuses such keys."""
    try:
        info = os.stat(path)
    except OSError as e:
        return f"cannot read {path}: {e.strerror}"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (chmod go-w {path})"
    if info.st_uid not in (os.getuid(), 0):
        return f"{path} belongs to another user (uid {info.st_uid})"
    return None


def _near_misses(instance: Any) -> list[tuple[str, str]]:
    """(method, hook) pairs where a public method's name is close to a hook's."""
    out = []
    for name in dir(type(instance)):
        if name.startswith("_") or name in _HOOK_NAMES:
            continue
        if not callable(getattr(instance, name, None)):
            continue
        near = difflib.get_close_matches(name.lower(), _HOOK_NAMES, n=1, cutoff=0.8)
        if near:
            out.append((name, near[0]))
    return out


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
        self, observed: Iterable[str] = (), policy: Iterable[str] = (), hook_timeout: float = 30.0
    ) -> None:
        self.hook_timeout = hook_timeout
        self.files = [AddonFile(Path(p), False) for p in observed]
        self.files += [AddonFile(Path(p), True) for p in policy]
        self._by_hook: dict[str, list[Addon]] = {}
        self._loaded = 0

    def load_all(self) -> None:
        """Load every file; a file that fails is a start-up error (ValueError)."""
        for f in self.files:
            error = self._load(f)
            if error:
                raise ValueError(error)
        self._index()

    def _load(self, f: AddonFile) -> str | None:
        """(Re)load one file; returns an error message, keeping the old version."""
        unsafe = unsafe_code(f.path)
        if unsafe is not None:
            log.error("addon refused: %s", unsafe)
            return f"addon refused: {unsafe}"
        try:
            mtime = os.stat(f.path).st_mtime
            self._loaded += 1
            name = f"eyewall_addon_{self._loaded}_{f.path.stem}"
            spec = importlib.util.spec_from_file_location(name, f.path)
            if spec is None or spec.loader is None:
                return f"addon {f.path}: not a Python file"
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            instances = _instances(module)
        except Exception as e:  # any error in user code must be reported, never raised
            log.error(
                "addon %s failed to load: %s: %s",
                f.path,
                e.__class__.__name__,
                e,
                exc_info=not isinstance(e, OSError),
            )
            return f"addon {f.path} failed to load: {e.__class__.__name__}: {e}"
        if not instances:
            return f"addon {f.path}: no class with a hook method (see docs/hooks.md)"
        for instance in instances:
            for method, hook in _near_misses(instance):
                error = (
                    f"addon {f.path}: {type(instance).__name__}.{method} is not a hook;"
                    f" did you mean {hook}? (see docs/hooks.md)"
                )
                log.error("%s", error)
                return error
        for old in f.addons:
            self._lifecycle(old, Done())
        f.addons = [Addon(f"{f.path.stem}.{type(i).__name__}", i, f.policy) for i in instances]
        f.mtime = mtime
        for addon in f.addons:
            self._lifecycle(addon, Load(Loader(f.path, logging.getLogger(f"addon.{addon.name}"))))
        return None

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
            result = method(*hook.args())
            if inspect.isawaitable(result):
                log.warning("addon %s: lifecycle hook %s must not be async", addon.name, hook.name)
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except Exception:
            log.exception("addon %s failed in %s", addon.name, hook.name)

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
        for addon in self._by_hook.get(name, ()):
            try:
                result = getattr(addon.instance, name)(*hook.args())
                if inspect.isawaitable(result):
                    async with asyncio.timeout(self.hook_timeout):
                        await result
            except TimeoutError:
                log.error(
                    "addon %s: %s took longer than timeouts.addon_hook (%g s); cancelled",
                    addon.name,
                    name,
                    self.hook_timeout,
                )
                if addon.policy:
                    raise AddonFailed(addon.name, name, "timed out") from None
            except Exception:
                log.exception("addon %s failed in %s", addon.name, name)
                if addon.policy:
                    raise AddonFailed(addon.name, name) from None

    def reload_changed(self, settings: Any) -> None:
        """Reload the files whose modification time changed (a failed one keeps its old
        version and logs why)."""
        changed = False
        for f in self.files:
            try:
                mtime = os.stat(f.path).st_mtime
            except OSError:
                continue
            if mtime != f.mtime and self._load(f) is None:
                changed = True
                log.info("addon %s reloaded", f.path)
                for addon in f.addons:
                    self._lifecycle(addon, Configure(settings))
                    self._lifecycle(addon, Running())
            elif mtime != f.mtime:
                f.mtime = mtime  # report a broken file once, not every second
        if changed:
            self._index()

"""Loading addon files, calling their hooks, reloading them when they change.

An exception in a hook is logged with the addon's name and the file's line, and traffic
goes on — unless the addon was loaded as a policy addon, in which case the exchange
fails closed (`AddonFailed`, answered 502).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from eyewall.addons.hooks import DATA_HOOKS, HOOKS

__all__ = ["AddonFailed", "Addons", "Loader"]

log = logging.getLogger("eyewall.addons")

_HOOK_NAMES = frozenset(h.name for h in HOOKS)
_DATA_NAMES = tuple(h.name for h in DATA_HOOKS)


class AddonFailed(Exception):
    def __init__(self, addon: str, hook: str) -> None:
        super().__init__(f"addon {addon} failed in {hook}")
        self.addon = addon
        self.hook = hook


@dataclass
class Loader:
    """Given to ``load``: what an addon may want to know about itself."""

    path: Path
    log: logging.Logger


@dataclass
class Addon:
    name: str
    instance: Any
    policy: bool


@dataclass
class AddonFile:
    path: Path
    policy: bool
    mtime: float = 0.0
    addons: list[Addon] = field(default_factory=list)


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
    def __init__(self, observed: Iterable[str] = (), policy: Iterable[str] = ()) -> None:
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
            log.error("addon %s failed to load: %s: %s", f.path, e.__class__.__name__, e,
                      exc_info=not isinstance(e, OSError))  # fmt: skip
            return f"addon {f.path} failed to load: {e.__class__.__name__}: {e}"
        if not instances:
            return f"addon {f.path}: no class with a hook method (see docs/hooks.md)"
        for old in f.addons:
            self._lifecycle(old, "done")
        f.addons = [Addon(f"{f.path.stem}.{type(i).__name__}", i, f.policy) for i in instances]
        f.mtime = mtime
        for addon in f.addons:
            self._lifecycle(addon, "load", Loader(f.path, logging.getLogger(f"addon.{addon.name}")))
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
        return bool(self._by_hook)

    def has(self, hook: str) -> bool:
        return hook in self._by_hook

    def _lifecycle(self, addon: Addon, hook: str, *args: Any) -> None:
        method = getattr(addon.instance, hook, None)
        if method is None:
            return
        try:
            result = method(*args)
            if inspect.isawaitable(result):
                log.warning("addon %s: lifecycle hook %s must not be async", addon.name, hook)
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except Exception:
            log.exception("addon %s failed in %s", addon.name, hook)

    def lifecycle(self, hook: str, *args: Any) -> None:
        for f in self.files:
            for addon in f.addons:
                self._lifecycle(addon, hook, *args)

    async def call(self, hook: str, *args: Any) -> None:
        """Run ``hook`` of every addon that has it, in load order."""
        for addon in self._by_hook.get(hook, ()):
            try:
                result = getattr(addon.instance, hook)(*args)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("addon %s failed in %s", addon.name, hook)
                if addon.policy:
                    raise AddonFailed(addon.name, hook) from None

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
                    self._lifecycle(addon, "configure", settings)
                    self._lifecycle(addon, "running")
            elif mtime != f.mtime:
                f.mtime = mtime  # report a broken file once, not every second
        if changed:
            self._index()

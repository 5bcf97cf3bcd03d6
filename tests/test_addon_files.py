"""Addon files are code run with the proxy's rights: they load only from files and
directories no one else can change (class 17d), always from their source; a plain hook
that holds the event loop is reported (class 18)."""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import py_compile
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from eyewall.addons.api import Client
from eyewall.addons.hooks import ClientConnected
from eyewall.addons.runner import AddonFailed, Addons, unsafe_code

SOURCE = "class A:\n    MARK = '{mark}'\n\n    def request(self, flow):\n        pass\n"


def write_addon(directory: Path, mark: str = "source!") -> Path:
    directory.mkdir(mode=0o755, exist_ok=True)
    path = directory / "probe.py"
    path.write_text(SOURCE.format(mark=mark))
    path.chmod(0o644)
    return path


def loaded_mark(addons: Addons) -> str:
    [addon] = addons.files[0].addons
    return str(addon.instance.MARK)


def test_a_planted_bytecode_cache_is_never_run(tmp_path: Path) -> None:
    path = write_addon(tmp_path / "addons")
    legit = path.read_bytes()
    stamp = os.stat(path)
    # Someone plants a cache whose header matches the source (same size and mtime), as
    # the import system would trust it.
    path.write_text(SOURCE.format(mark="planted"))
    assert path.stat().st_size == stamp.st_size
    cache = Path(py_compile.compile(str(path), cfile=None, doraise=True))
    assert cache.parent.name == "__pycache__" and sys.implementation.cache_tag in cache.name
    path.write_bytes(legit)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    addons = Addons([str(path)])
    addons.load_all()
    assert loaded_mark(addons) == "source!"


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_directory_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = write_addon(tmp_path / "addons")
    path.parent.chmod(mode)
    problem = unsafe_code(path)
    assert problem is not None and f"directory {path.parent} is writable" in problem
    with pytest.raises(ValueError, match="writable by group or others"):
        Addons([str(path)]).load_all()


def test_a_sticky_shared_directory_is_accepted(tmp_path: Path) -> None:
    # Like /tmp: others may add files but cannot replace or rename this one.
    path = write_addon(tmp_path / "shared")
    path.parent.chmod(0o1777)
    assert unsafe_code(path) is None


def test_a_symlink_is_checked_on_both_paths(tmp_path: Path) -> None:
    path = write_addon(tmp_path / "real")
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    link = open_dir / "probe.py"
    link.symlink_to(path)
    problem = unsafe_code(link)
    assert problem is not None and str(open_dir) in problem


def test_files_others_can_write_are_refused(tmp_path: Path) -> None:
    path = write_addon(tmp_path / "addons")
    path.chmod(0o664)
    with pytest.raises(ValueError, match=r"probe\.py is writable by group or others"):
        Addons([str(path)]).load_all()


def test_fixing_the_mode_reloads_without_an_edit(tmp_path: Path) -> None:
    path = write_addon(tmp_path / "addons")
    addons = Addons([str(path)])
    addons.load_all()
    path.write_text(SOURCE.format(mark="second!"))
    path.chmod(0o666)
    addons.reload_changed(None)
    assert loaded_mark(addons) == "source!"  # refused: the old version keeps running
    path.chmod(0o644)  # the fix the message suggests; the content is unchanged
    addons.reload_changed(None)
    assert loaded_mark(addons) == "second!"


def test_a_loaded_file_that_goes_away_is_said_once_and_comes_back_on_return(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_addon(tmp_path / "addons")
    addons = Addons([str(path)])
    addons.load_all()
    kept = path.read_text()
    path.unlink()
    for _ in range(3):
        addons.reload_changed(None)
    gone = [r for r in caplog.records if "keeps running" in r.getMessage()]
    assert len(gone) == 1 and "No such file" in gone[0].getMessage()
    assert loaded_mark(addons) == "source!"  # still the version loaded before
    path.write_text(kept.replace("source!", "back!"))
    path.chmod(0o644)
    addons.reload_changed(None)
    assert loaded_mark(addons) == "back!"


# -- a plain hook holds the event loop: reported, and past the hook timeout a failure ----

SLOW = """
import builtins


class Slow:
    def client_connected(self, client):
        builtins.eyewall_test_clock.advance(builtins.eyewall_test_hold)
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def slow_addons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[float, bool], Addons]:
    clock = Clock()
    monkeypatch.setattr(builtins, "eyewall_test_clock", clock, raising=False)
    path = tmp_path / "addons"
    path.mkdir(mode=0o755)
    (path / "slow.py").write_text(SLOW)

    def make(hold: float, policy: bool) -> Addons:
        monkeypatch.setattr(builtins, "eyewall_test_hold", hold, raising=False)
        files = [str(path / "slow.py")]
        observed, policies = ((), files) if policy else (files, ())
        addons = Addons(observed, policies, hook_timeout=2.0, clock=clock)
        addons.load_all()
        return addons

    return make


def test_a_plain_hook_that_blocks_is_reported_once_a_minute(
    slow_addons: Callable[[float, bool], Addons], caplog: pytest.LogCaptureFixture
) -> None:
    addons = slow_addons(0.5, False)
    hook = ClientConnected(Client(("127.0.0.1", 1)))
    with caplog.at_level(logging.WARNING, logger="eyewall.addons"):
        for _ in range(3):
            asyncio.run(addons.call(hook))
    blocked = [r.getMessage() for r in caplog.records if "blocked the event loop" in r.getMessage()]
    assert blocked == [
        "addon slow.Slow: client_connected blocked the event loop for 0.50 s (every"
        " connection waited); make it an async hook that awaits slow work, or faster"
        " (said at most once a minute per addon)"
    ]


def test_an_async_hook_that_blocks_between_awaits_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Making a slow plain hook async does not help if it still blocks: said too."""
    path = addon_file(
        tmp_path / "addons",
        "sleepy.py",
        "import asyncio, time\nclass S:\n    async def client_connected(self, client):\n"
        "        await asyncio.sleep(0)\n        time.sleep(0.3)\n",
    )
    addons = Addons([str(path)], hook_timeout=5.0)
    addons.load_all()
    with caplog.at_level(logging.WARNING, logger="eyewall.addons"):
        asyncio.run(addons.call(ClientConnected(Client(("127.0.0.1", 1)))))
    [said] = [r.getMessage() for r in caplog.records if "blocked the event loop" in r.getMessage()]
    assert "client_connected blocked the event loop for 0.3" in said
    assert "between two awaits" in said and "run_in_executor" in said
    assert addons.failures == {}


def test_a_plain_hook_past_the_timeout_fails_a_policy_addon(
    slow_addons: Callable[[float, bool], Addons], caplog: pytest.LogCaptureFixture
) -> None:
    hook = ClientConnected(Client(("127.0.0.1", 1)))
    policy = slow_addons(3.0, True)
    with pytest.raises(AddonFailed, match="timed out in client_connected"):
        asyncio.run(policy.call(hook))
    observed = slow_addons(3.0, False)
    with caplog.at_level(logging.ERROR, logger="eyewall.addons"):
        asyncio.run(observed.call(hook))  # observed: logged, traffic goes on
    assert any("took longer than timeouts.addon_hook" in r.getMessage() for r in caplog.records)
    for addons in (policy, observed):  # and counted, for eyewall_addon_failures_total
        assert addons.failures == {("slow.Slow", "client_connected", "timeout"): 1}
    quick = slow_addons(0.05, True)
    asyncio.run(quick.call(hook))  # fast enough: nothing to say
    assert quick.failures == {}


def test_a_hook_that_raises_is_counted(tmp_path: Path) -> None:
    path = addon_file(
        tmp_path / "addons", "raising.py", "class R:\n    def client_connected(self, c): 1 / 0\n"
    )
    addons = Addons([str(path)])
    addons.load_all()
    for _ in range(2):
        asyncio.run(addons.call(ClientConnected(Client(("127.0.0.1", 1)))))
    assert addons.failures == {("raising.R", "client_connected", "error"): 2}


# -- misspelt hooks and check-config ------------------------------------------------------

MISSPELT = {
    "beside a real hook": "class A:\n    def request(self, flow): pass\n"
    "    def request_headers(self, flow): pass\n",
    "alone": "class A:\n    def reqeustheaders(self, flow): pass\n",
}


def addon_file(directory: Path, name: str, source: str) -> Path:
    directory.mkdir(mode=0o755, exist_ok=True)
    path = directory / name
    path.write_text(source)
    path.chmod(0o644)
    return path


@pytest.mark.parametrize("case", sorted(MISSPELT))
def test_a_misspelt_hook_is_an_error_at_load_time(tmp_path: Path, case: str) -> None:
    path = addon_file(tmp_path / "addons", "typo.py", MISSPELT[case])
    with pytest.raises(ValueError, match=r"A\.\w+ is not a hook; did you mean requestheaders\?"):
        Addons([str(path)]).load_all()


def test_check_reports_every_file_and_starts_no_addon(tmp_path: Path) -> None:
    directory = tmp_path / "addons"
    started = tmp_path / "started"
    good = addon_file(
        directory,
        "good.py",
        f"class A:\n    def load(self, loader): open({str(started)!r}, 'w').close()\n"
        "    def request(self, flow): pass\n",
    )
    typo = addon_file(directory, "typo.py", MISSPELT["alone"])
    broken = addon_file(directory, "broken.py", "x = 1\nraise RuntimeError('boom')\n")
    errors = Addons([str(good), str(typo)], [str(broken)]).check()
    assert len(errors) == 2
    assert "typo.py: A.reqeustheaders is not a hook; did you mean requestheaders?" in errors[0]
    assert errors[1].endswith("broken.py failed to load (line 2): RuntimeError: boom")
    assert not started.exists()  # the file ran, its addon was not started
    assert Addons([str(good)]).check() == []


def test_check_config_refuses_what_start_up_would_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from eyewall.cli import check_config

    addon_file(tmp_path / "addons", "typo.py", MISSPELT["beside a real hook"])
    config = tmp_path / "eyewall.toml"
    config.write_text('addons = ["addons/typo.py"]\n')
    assert check_config([str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{config}: invalid\n")
    assert f"{config}:1: addons[0]: addon " in err
    assert "A.request_headers is not a hook; did you mean requestheaders?" in err
    assert err.count("is not a hook") == 1  # the answer, not a log line besides
    assert check_config([str(config)], check_paths=False) == 0  # --no-paths: not run
    # with other problems in the file too: all of them at once
    config.write_text('addons = ["addons/typo.py"]\n[limitz]\nx = 1\n')
    assert check_config([str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{config}:1: addons[0]: addon " in err and "is not a hook" in err
    assert f"{config}:2: limitz: unknown setting" in err


@pytest.mark.parametrize("ending", ["raise SystemExit(0)", "raise KeyboardInterrupt"])
def test_addon_code_that_would_end_the_program_is_a_failed_addon_not_a_stop(
    tmp_path: Path, ending: str
) -> None:
    """sys.exit or an interrupt raised by addon code ends neither the proxy nor
    check-config: a hook fails (logged, counted), a file fails to load (reported)."""
    hooked = addon_file(
        tmp_path / "addons", "exits.py", f"class E:\n    def client_connected(self, c): {ending}\n"
    )
    addons = Addons([str(hooked)])
    addons.load_all()
    asyncio.run(addons.call(ClientConnected(Client(("127.0.0.1", 1)))))
    assert addons.failures == {("exits.E", "client_connected", "error"): 1}
    policy = Addons([], [str(hooked)])
    policy.load_all()
    with pytest.raises(AddonFailed):
        asyncio.run(policy.call(ClientConnected(Client(("127.0.0.1", 1)))))
    top = addon_file(tmp_path / "addons", "top.py", f"{ending}\n")
    with pytest.raises(ValueError, match=r"top\.py failed to load"):
        Addons([str(top)]).load_all()
    [problem] = Addons([str(top)]).check()
    assert "top.py failed to load (line 1)" in problem


def test_check_names_every_misspelt_hook_and_every_listed_object_without_hooks(
    tmp_path: Path,
) -> None:
    misspelt = addon_file(
        tmp_path / "addons",
        "three.py",
        "class A:\n    def requestheader(self, f): pass\n    def Response(self, f): pass\n"
        "    def reponse(self, f): pass\n",
    )
    [problem] = Addons([str(misspelt)]).check()
    for name in ("A.requestheader", "A.Response", "A.reponse"):
        assert f"{name} is not a hook" in problem
    listed = addon_file(tmp_path / "addons", "listed.py", 'addons = [1, "x"]\n')
    [problem] = Addons([str(listed)]).check()
    assert "addons[0] (1) has no hook method; addons[1] ('x') has no hook method" in problem


# -- addon code that never returns ----------------------------------------------------------

ENDLESS = {
    "a loop at the top level": "while True:\n    pass\n",
    "a blocking call at the top level": "import time\ntime.sleep(3600)\n",
    "a loop in __init__": "class A:\n    def __init__(self):\n        while True: pass\n"
    "    def request(self, flow): pass\n",
}


@pytest.mark.parametrize("case", ENDLESS)
def test_addon_code_that_never_returns_fails_to_load_and_stops(tmp_path: Path, case: str) -> None:
    """An endless loop or a blocking call while a file loads (at start-up, in
    check-config, on a hot reload) fails that file after timeouts.addon_hook, named,
    and the proxy goes on: a reload keeps the version loaded before."""
    path = addon_file(tmp_path / "addons", "endless.py", ENDLESS[case])
    [problem] = Addons([str(path)], hook_timeout=0.2).check()
    assert "endless.py did not finish loading (line " in problem
    assert problem.endswith("within timeouts.addon_hook (0.2 s)")
    with pytest.raises(ValueError, match="did not finish loading"):
        Addons([str(path)], hook_timeout=0.2).load_all()
    path.write_text(SOURCE.format(mark="first"))
    addons = Addons([str(path)], hook_timeout=0.2)
    addons.load_all()
    path.write_text(ENDLESS[case] + "# edited\n")
    addons.reload_changed(None)
    assert loaded_mark(addons) == "first"


ENDLESS_HOOKS = (
    "import time\n"
    "class A:\n"
    "    def load(self, loader):\n"
    "        while True: pass\n"
    "    def client_connected(self, client):\n"
    "        time.sleep(3600)\n"
)


def test_a_plain_hook_that_never_returns_is_stopped(tmp_path: Path) -> None:
    """A lifecycle hook or a plain data hook that never returns holds the event loop:
    it is stopped after timeouts.addon_hook and counts as a timed-out hook (a policy
    addon then fails the exchange), and the next call runs again."""
    path = addon_file(tmp_path / "addons", "stuck.py", ENDLESS_HOOKS)
    hook = ClientConnected(Client(("127.0.0.1", 1)))
    observed = Addons([str(path)], hook_timeout=0.2)
    observed.load_all()
    assert observed.failures == {("stuck.A", "load", "timeout"): 1}
    asyncio.run(observed.call(hook))
    asyncio.run(observed.call(hook))
    assert observed.failures[("stuck.A", "client_connected", "timeout")] == 2
    policy = Addons([], [str(path)], hook_timeout=0.2)
    policy.load_all()
    with pytest.raises(AddonFailed, match="timed out in client_connected"):
        asyncio.run(policy.call(hook))


def test_the_bound_is_lifted_once_the_code_returns(tmp_path: Path) -> None:
    """No stray signal after bounded code returns (a timer left armed would interrupt
    the proxy's own code), and outside the main thread code runs unbounded."""
    import signal
    import threading

    from eyewall.addons.runner import bounded

    with bounded(0.05):
        pass
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    done = threading.Event()

    def elsewhere() -> None:
        with bounded(0.01):
            threading.Event().wait(0.05)
        done.set()

    worker = threading.Thread(target=elsewhere)
    worker.start()
    worker.join()
    assert done.is_set()


def test_a_hook_that_catches_the_first_stop_is_stopped_again(tmp_path: Path) -> None:
    path = addon_file(
        tmp_path / "addons",
        "stubborn.py",
        "import time\n"
        "class S:\n"
        "    caught = 0\n"
        "    def client_connected(self, client):\n"
        "        while True:\n"
        "            try:\n"
        "                time.sleep(3600)\n"
        "            except BaseException:\n"
        "                S.caught += 1\n"
        "                if S.caught == 1: continue\n"
        "                raise\n",
    )
    addons = Addons([str(path)], hook_timeout=0.1)
    addons.load_all()
    asyncio.run(addons.call(ClientConnected(Client(("127.0.0.1", 1)))))
    assert addons.failures == {("stubborn.S", "client_connected", "timeout"): 1}
    assert addons.files[0].addons[0].instance.caught == 2


ASYNC_HOOKS = (
    "import asyncio, time\n"
    "class A:\n"
    "    cleaned = 0\n"
    "    async def client_connected(self, client):\n"
    "        if client.address[1] == 1:\n"
    "            time.sleep(3600)  # blocks the event loop: a synchronous call\n"
    "        elif client.address[1] == 2:\n"
    "            await asyncio.sleep(0)\n"
    "            while True: pass  # blocks after an await\n"
    "        elif client.address[1] == 3:\n"
    "            try:\n"
    "                await asyncio.sleep(3600)  # waits: cancelled, and cleans up\n"
    "            finally:\n"
    "                A.cleaned += 1\n"
    "        else:\n"
    "            await asyncio.sleep(0)\n"
    "            return 'ignored'\n"
)


def test_an_async_hook_that_blocks_is_stopped_and_one_that_waits_is_cancelled(
    tmp_path: Path,
) -> None:
    """Each step of an async hook runs on the event loop, like a plain hook: one that
    blocks (before or after an await) is stopped after timeouts.addon_hook; one that
    waits is cancelled, its cleanup run; one that finishes is no failure."""
    path = addon_file(tmp_path / "addons", "steps.py", ASYNC_HOOKS)
    addons = Addons([str(path)], hook_timeout=0.2)
    addons.load_all()
    for port in (1, 2, 3, 4):
        asyncio.run(addons.call(ClientConnected(Client(("127.0.0.1", port)))))
    assert addons.failures == {("steps.A", "client_connected", "timeout"): 3}
    assert addons.files[0].addons[0].instance.cleaned == 1
    policy = Addons([], [str(path)], hook_timeout=0.2)
    policy.load_all()
    with pytest.raises(AddonFailed, match="timed out in client_connected"):
        asyncio.run(policy.call(ClientConnected(Client(("127.0.0.1", 1)))))


def test_an_addon_that_takes_sigalrm_keeps_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Addon code that installs its own SIGALRM handler keeps it: the runner says that
    addon code is no longer stopped, and never arms a timer that would call the
    addon's handler (or, with SIG_DFL, end the process)."""
    import signal

    from eyewall.addons import runner

    first = addon_file(tmp_path / "addons", "first.py", SOURCE.format(mark="x"))
    Addons([str(first)], hook_timeout=5).load_all()  # the runner owns SIGALRM now
    taker = addon_file(
        tmp_path / "addons",
        "taker.py",
        "import signal\nCALLS = []\nsignal.signal(signal.SIGALRM, lambda *a: CALLS.append(a))\n"
        + SOURCE.format(mark="y"),
    )
    try:
        with caplog.at_level(logging.WARNING, logger="eyewall.addons"):
            addons = Addons([str(taker)], hook_timeout=5)
            addons.load_all()
        assert any("set its own SIGALRM handler" in r.getMessage() for r in caplog.records)
        mine = signal.getsignal(signal.SIGALRM)
        assert mine is not runner._overran
        with runner.bounded(0.01):
            pass
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # never armed
        assert signal.getsignal(signal.SIGALRM) is mine
    finally:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        runner._owned = False  # looked at again on next use


@pytest.mark.parametrize(
    ("source", "said"),
    [
        ("class A:\n    def request(self): pass\n", "A.request must take (flow) besides self"),
        ("class A:\n    def request(self, f, g): pass\n", "A.request must take (flow)"),
        ("class A:\n    def running(self, x): pass\n", "A.running must take no argument"),
        ("class A:\n    @staticmethod\n    def request(): pass\n", "A.request must take"),
    ],
)
def test_a_hook_that_cannot_take_its_arguments_is_an_error_at_load_time(
    tmp_path: Path, source: str, said: str
) -> None:
    """Every call of such a hook would fail: check-config and start-up say so."""
    path = addon_file(tmp_path / "addons", "arity.py", source)
    [problem] = Addons([str(path)]).check()
    assert said in problem
    with pytest.raises(ValueError, match="must take"):
        Addons([str(path)]).load_all()


@pytest.mark.parametrize(
    "source",
    [
        "class A:\n    def request(self, flow, extra=None): pass\n",
        "class A:\n    def request(self, *args): pass\n",
        "class A:\n    async def request(self, flow): pass\n",
        "class A:\n    def request(self, flow): pass\n    def _responses(self): pass\n",
    ],
)
def test_hooks_that_take_their_arguments_load(tmp_path: Path, source: str) -> None:
    path = addon_file(tmp_path / "addons", "fine.py", source)
    assert Addons([str(path)]).check() == []


def test_a_hook_failing_on_every_call_logs_its_traceback_once_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = addon_file(
        tmp_path / "addons", "flaky.py", "class F:\n    def client_connected(self, c): 1 / 0\n"
    )
    clock = Clock()
    addons = Addons([str(path)], clock=clock)
    addons.load_all()
    hook = ClientConnected(Client(("127.0.0.1", 1)))
    with caplog.at_level(logging.ERROR, logger="eyewall.addons"):
        for _ in range(3):
            asyncio.run(addons.call(hook))
        clock.advance(60)
        asyncio.run(addons.call(hook))
    records = [r for r in caplog.records if "flaky.F failed in client_connected" in r.getMessage()]
    assert len(records) == 4  # every failure is said ...
    assert [r.exc_info is not None for r in records] == [True, False, False, True]  # ... once
    assert "ZeroDivisionError: division by zero (traceback shown" in records[1].getMessage()
    assert addons.failures == {("flaky.F", "client_connected", "error"): 4}


RETRYING = (
    "import time\n"
    "class R:\n"
    "    def client_connected(self, client):\n"
    "        while True:  # a retry loop: every Exception is taken for a failed try\n"
    "            try:\n"
    "                time.sleep(0.05)\n"
    "                raise ConnectionError\n"
    "            except Exception:\n"
    "                pass\n"
)


def test_a_retry_loop_catching_every_exception_is_stopped(tmp_path: Path) -> None:
    """The stop is not an Exception (as KeyboardInterrupt is not): ``except Exception``
    in the addon does not swallow it, in a hook or at a file's top level."""
    path = addon_file(tmp_path / "addons", "retry.py", RETRYING)
    addons = Addons([str(path)], hook_timeout=0.2)
    addons.load_all()
    asyncio.run(addons.call(ClientConnected(Client(("127.0.0.1", 1)))))
    assert addons.failures == {("retry.R", "client_connected", "timeout"): 1}
    top = addon_file(
        tmp_path / "addons",
        "top.py",
        "import time\nwhile True:\n    try:\n        time.sleep(0.05)\n"
        "    except Exception:\n        pass\n",
    )
    [problem] = Addons([str(top)], hook_timeout=0.2).check()
    assert "did not finish loading" in problem


STUBBORN_ASYNC = (
    "import asyncio\n"
    "class S:\n"
    "    async def client_connected(self, client):\n"
    "        while True:\n"
    "            try:\n"
    "                await asyncio.sleep(3600)\n"
    "            except BaseException:  # cancellation too\n"
    "                pass\n"
)


def test_an_async_hook_that_ignores_its_cancellation_is_abandoned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """After timeouts.addon_hook it is cancelled; ignoring that, it is abandoned after
    a grace: the exchange goes on (a policy addon's fails closed), and nothing keeps
    the event loop from ending."""
    from eyewall.addons import runner

    monkeypatch.setattr(runner, "CANCEL_GRACE", 0.1)
    # The abandoned hook is finalized at once, while the loop runs (it ignores that
    # too, which Python reports); pytest's own hook would keep it alive for later.
    unraisable: list[str] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(str(u.exc_value)))
    path = addon_file(tmp_path / "addons", "deaf.py", STUBBORN_ASYNC)
    hook = ClientConnected(Client(("127.0.0.1", 1)))
    observed = Addons([str(path)], hook_timeout=0.2)
    observed.load_all()
    with caplog.at_level(logging.ERROR, logger="eyewall.addons"):
        asyncio.run(observed.call(hook))  # returns, and the loop closes
    assert observed.failures == {("deaf.S", "client_connected", "timeout"): 1}
    assert any("ignored its cancellation" in r.getMessage() for r in caplog.records)
    assert unraisable == ["coroutine ignored GeneratorExit"]
    policy = Addons([], [str(path)], hook_timeout=0.2)
    policy.load_all()
    with pytest.raises(AddonFailed, match="timed out"):
        asyncio.run(policy.call(hook))


AWAITABLES = (
    "import asyncio, time\n"
    "class Blocking:\n"
    "    def __await__(self):\n"
    "        time.sleep(3600)  # on the event loop, before any await\n"
    "        yield from ()\n"
    "class A:\n"
    "    def client_connected(self, client):\n"
    "        if client.address[1] == 1:\n"
    "            return Blocking()\n"
    "        return asyncio.get_running_loop().create_future()  # never resolved\n"
)


def test_a_hook_returning_another_awaitable_is_bounded_as_an_async_hook(tmp_path: Path) -> None:
    path = addon_file(tmp_path / "addons", "awaits.py", AWAITABLES)
    addons = Addons([str(path)], hook_timeout=0.2)
    addons.load_all()
    for port in (1, 2):
        asyncio.run(addons.call(ClientConnected(Client(("127.0.0.1", port)))))
    assert addons.failures == {("awaits.A", "client_connected", "timeout"): 2}


def test_addon_code_that_ignores_every_stop_ends_the_process(tmp_path: Path) -> None:
    """A bare ``except:`` in a loop catches every stop: nothing else can ever run on the
    event loop, a stop signal included, so the process exits (status 70, for the
    service manager to restart it) once the code has ignored stops for as long as it
    was allowed to run (at least a second), saying why."""
    path = addon_file(
        tmp_path / "addons",
        "deaf.py",
        "import time\nwhile True:\n    try:\n        time.sleep(0.05)\n    except:\n        pass\n",
    )
    config = tmp_path / "eyewall.toml"
    config.write_text(f'addons = ["{path}"]\n[timeouts]\naddon_hook = 0.2\n')
    done = subprocess.run(
        [sys.executable, "-m", "eyewall", "check-config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert done.returncode == 70, done.stderr
    assert "addon code has ignored being stopped for 1." in done.stderr

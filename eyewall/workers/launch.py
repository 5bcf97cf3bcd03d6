"""What ``eyewall`` runs: one process (``workers = 1``, as always) or a supervisor and
its workers; either may be a new generation taking over from a running one
(`eyewall.workers.handover`)."""

from __future__ import annotations

import gc
import os
import sys

from eyewall.app import Loader, run, run_loop
from eyewall.config import ConfigError
from eyewall.observe.oplog import setup_logging
from eyewall.workers import worker_count
from eyewall.workers.handover import Inherited

__all__ = ["launch"]


def launch(loader: Loader) -> int:
    """Load the configuration and run the proxy until it is stopped; the exit status
    (2: invalid configuration)."""
    try:
        inherited = Inherited.from_environment()
        loaded = loader.load()
    except ConfigError as e:
        print("eyewall: invalid configuration:", file=sys.stderr)
        for error in e.errors:
            print(f"  {error}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"eyewall: {e}", file=sys.stderr)
        return 2
    count = worker_count(loaded.settings.workers)
    if count == 1:
        if inherited is not None and inherited.limits_fd is not None:
            os.close(inherited.limits_fd)  # a supervisor's limits: one process keeps its own
            inherited.limits_fd = None
        return run(loader, loaded, inherited)
    from eyewall.workers.supervisor import Supervisor

    handler, listener = setup_logging(loaded.settings.log_level)
    gc.set_threshold(50_000, 50, 100)  # as eyewall.app.run: the supervisor sees every flow
    gc.freeze()
    sys.setswitchinterval(0.001)  # as eyewall.app.run: the writer thread lives here
    status = [1]

    async def main() -> None:
        status[0] = await Supervisor(loader, loaded, count, handler, inherited).run()

    try:
        run_loop(main(), loaded.settings.event_loop)
    except KeyboardInterrupt:
        return 130
    finally:
        listener.stop()
    return status[0]

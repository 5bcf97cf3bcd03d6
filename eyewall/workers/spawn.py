"""The command line and environment that start another Eyewall process (a worker, a
restart's new generation) on this process's own code.

``python -m`` puts the working directory first on the import path: started from a
directory holding its own ``eyewall`` package (a checkout, or a planted one), a child
would run that code instead.  ``-P`` (Python 3.11) leaves the working directory out,
and ``PYTHONPATH`` names the directory this process's ``eyewall`` came from, so a
child started from a source checkout still finds it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import eyewall

__all__ = ["child_process"]


def child_process(
    module: str, args: list[str], env: Mapping[str, str]
) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) that run ``python -m module args`` with ``env`` on the
    eyewall package this process runs."""
    home = str(Path(eyewall.__file__).resolve().parent.parent)
    paths = [home, *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    return (
        [sys.executable, "-P", "-m", module, *args],
        {**env, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))},
    )

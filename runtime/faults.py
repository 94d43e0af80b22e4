"""Named kill points for the fault-injection tests (tests/test_faults.py).

``fault_point("train:after-checkpoint")`` does nothing unless ``$TOOLKIT_FAULT`` names that point, optionally
with the hit to stop at (``train:after-checkpoint@2``); then the process SIGKILLs itself right there, as a
``kill -9`` or a power cut would, so the tests can check what survives at exactly that moment instead of
racing a timer. Costs one dictionary lookup per call when unset.
"""
from __future__ import annotations

import os
import signal

ENV = "TOOLKIT_FAULT"
_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    wanted = os.environ.get(ENV)
    if not wanted or wanted.split("@")[0] != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(wanted.split("@")[1] if "@" in wanted else 1):
        os.kill(os.getpid(), signal.SIGKILL)

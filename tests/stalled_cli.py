"""A command line run by a launcher with its processes held at known points, so that a test kills the job
while a step is certainly in flight, or forces an interleaving of the processes (never because a sleep
was long enough).

    torchrun --nproc_per_node 2 tests/stalled_cli.py saev_store.cli record --out X ...

The first argument names the CLI module; the rest are its arguments. The environment says where to hold
(a place is `module:function` or `module:Class.method`, replaced in that one process):
  STALL_RANK, STALL_AT, STALL_AFTER, STALL_MARK
      after STALL_AFTER calls of STALL_AT have gone through (default 0), process STALL_RANK writes its
      pid to the file STALL_MARK and waits forever (the test kills it)
  LATE_RANK, LATE_AT, LATE_UNTIL
      process LATE_RANK calls LATE_AT only once the file LATE_UNTIL exists (another process wrote it):
      it then finds what process 0 has just created
"""

import importlib
import os
import pathlib
import sys
import threading
import time

RANK = int(os.environ["RANK"])


def _wrap(place: str, before) -> None:
    """Replace the function at `place` by one that calls `before()` first."""
    mod_name, _, attr_path = place.partition(":")
    owner = importlib.import_module(mod_name)
    *parents, name = attr_path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        before()
        return original(*args, **kwargs)

    setattr(owner, name, wrapped)


if "STALL_AT" in os.environ and RANK == int(os.environ["STALL_RANK"]):
    calls = [0]

    def stall():
        calls[0] += 1
        if calls[0] > int(os.environ.get("STALL_AFTER", "0")):
            mark = pathlib.Path(os.environ["STALL_MARK"])
            mark.with_name(mark.name + ".partial").write_text(str(os.getpid()))
            os.replace(mark.with_name(mark.name + ".partial"), mark)
            threading.Event().wait()

    _wrap(os.environ["STALL_AT"], stall)

if "LATE_AT" in os.environ and RANK == int(os.environ["LATE_RANK"]):
    until = pathlib.Path(os.environ["LATE_UNTIL"])

    def wait():
        while not until.exists():
            time.sleep(0.01)

    _wrap(os.environ["LATE_AT"], wait)

cli = importlib.import_module(sys.argv[1])
sys.argv = [sys.argv[1], *sys.argv[2:]]
cli.main()

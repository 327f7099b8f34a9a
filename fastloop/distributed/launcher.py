"""``python train.py`` with ``Trainer(devices=N)``, N > 1: start N workers with torch's own
launcher API and exit with their status.

The process the user started becomes the launcher (what ``torchrun --standalone
--nproc-per-node=N train.py ...`` would be): it calls ``elastic_launch`` with a c10d rendezvous
on a free local port, which re-runs the same command line (``sys.orig_argv``: the same script
or ``-m`` module and arguments) N times with torchrun's variables set. In each worker the
``Trainer`` then joins the process group and trains. When the workers are done, the launcher
exits: status 0 when every worker succeeded, else the first failed worker's exit code (1 for
a signal), after printing torch's failure summary (which rank failed, and its error). Code of
the script before ``Trainer(...)`` therefore runs in the launcher too, code after it only in
the workers. Several nodes need ``torchrun`` on each node (see README).
"""
from __future__ import annotations

import os
import sys
import uuid
from typing import List, NoReturn

LAUNCHER_MONITOR_INTERVAL_S = 0.1  # how often the agent checks its workers (torchrun's default)


def script_command() -> List[str]:
    """The arguments that re-run this program (after the interpreter path), or an error saying why
    it cannot be re-run."""
    main = sys.modules.get("__main__")
    if os.environ.get("PYTEST_CURRENT_TEST") and "_pytest" in sys.modules:
        raise RuntimeError("it would re-run the test runner (pytest); launch the training script with torchrun")
    if main is None or not getattr(main, "__file__", None) or hasattr(sys, "ps1"):
        raise RuntimeError("this is an interactive session, there is no script to re-run; put the training in "
                           "a script and run it, or launch it with torchrun")
    argv = list(getattr(sys, "orig_argv", []))[1:]
    if not argv:
        raise RuntimeError("the command line of this process is unknown")
    return argv


def relaunch_in_workers(nprocs: int, what: str) -> NoReturn:
    """Run this program in ``nprocs`` worker processes under torch's elastic agent; exit with
    their status. ``what`` names the Trainer argument asking for it, for errors."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    try:
        argv = script_command()
    except RuntimeError as err:
        raise ValueError(f"{what} runs {nprocs} processes: outside torchrun fastloop re-runs this program in "
                         f"{nprocs} workers, but {err}") from None
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=f"fastloop-{uuid.uuid4()}",
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
        monitor_interval=LAUNCHER_MONITOR_INTERVAL_S,
    )
    try:
        elastic_launch(config, sys.executable)(*argv)
    except ChildFailedError as err:
        print(err.format_msg(), file=sys.stderr)
        codes = [f.exitcode for f in err.failures.values() if f.exitcode and f.exitcode > 0]
        raise SystemExit(codes[0] if codes else 1) from None
    raise SystemExit(0)

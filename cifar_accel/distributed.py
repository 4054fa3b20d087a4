"""A process group that cannot form stops in bounded time, with one line naming what it waited for.

Under ``accelerate launch --num_machines N`` the launchers first meet at ``--main_process_ip``:
``--main_process_port`` (bounded by the launcher's ``--rdzv_conf timeout=SECONDS``, 900 by
default). Then every training process joins the process group when its ``Accelerator`` is built;
a partner whose script never gets there (it failed first, or runs another command) would leave
the others waiting for 30 minutes. ``process_group_deadline`` bounds that second wait by
``CIFAR_ACCEL_JOIN_TIMEOUT`` seconds (default 300).
"""

import math
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from cifar_accel.errors import EXIT_USER_ERROR, UserError

JOIN_TIMEOUT_VARIABLE = "CIFAR_ACCEL_JOIN_TIMEOUT"
DEFAULT_JOIN_TIMEOUT = 300.0


def join_timeout(environ: Mapping[str, str] = os.environ) -> float:
    """Seconds the processes may take to form their group: ``CIFAR_ACCEL_JOIN_TIMEOUT``, else 300."""
    raw = environ.get(JOIN_TIMEOUT_VARIABLE, "").strip()
    if not raw:
        return DEFAULT_JOIN_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise UserError(f"{JOIN_TIMEOUT_VARIABLE} must be a number of seconds greater than 0, got {raw!r}")
    return seconds


def deadline_message(seconds: float, environ: Mapping[str, str] = os.environ) -> str:
    """The one line printed when the group did not form: who waited, for which address and port."""
    rank, world_size = environ.get("RANK", "?"), environ.get("WORLD_SIZE", "?")
    address = f"{environ.get('MASTER_ADDR', '?')}:{environ.get('MASTER_PORT', '?')}"
    return (
        f"error: the process group did not form within {seconds:g} s: rank {rank} of {world_size} waited for "
        f"{address} (MASTER_ADDR:MASTER_PORT) and the other processes never joined; start every machine with the "
        f"same --num_machines, --num_processes, --main_process_ip and --main_process_port and the same command, "
        f"or raise {JOIN_TIMEOUT_VARIABLE} (seconds, default {DEFAULT_JOIN_TIMEOUT:g})"
    )


def _stop(message: str) -> None:
    try:
        sys.stdout.flush()
        print(message, file=sys.stderr, flush=True)
    finally:
        # The main thread is blocked inside the process group's C++ code: only leaving the process ends it.
        os._exit(EXIT_USER_ERROR)


@contextmanager
def process_group_deadline(seconds: float | None = None) -> Iterator[None]:
    """Around building the ``Accelerator``: if the block has not finished within ``seconds`` (default
    ``join_timeout()``), print one line to stderr and exit with status 2.

    A single process (``WORLD_SIZE`` unset or 1) waits for nobody: the block runs unwatched.
    """
    seconds = join_timeout() if seconds is None else seconds
    if int(os.environ.get("WORLD_SIZE", "1") or "1") <= 1:
        yield
        return
    finished = threading.Event()
    message = deadline_message(seconds)

    def watch() -> None:
        if not finished.wait(seconds):
            _stop(message)

    watchdog = threading.Thread(target=watch, name="cifar-accel-join-deadline", daemon=True)
    watchdog.start()
    try:
        yield
    finally:
        finished.set()

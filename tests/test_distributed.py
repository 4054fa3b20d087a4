"""A process group that cannot form stops in bounded time with one line naming the address and port.

Two waits exist under ``accelerate launch --num_machines 2``: the launchers' rendezvous (before any
script runs; bounded by ``--rdzv_conf timeout=SECONDS``) and, once they met, the training processes
joining the group as the Accelerator is built (bounded by ``CIFAR_ACCEL_JOIN_TIMEOUT``).
"""

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO_ROOT, accelerate_launch

from cifar_accel.distributed import DEFAULT_JOIN_TIMEOUT, join_timeout, process_group_deadline
from cifar_accel.errors import UserError


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _two_machine_launch(machine_rank: int, port: int, *extra: str) -> list[str]:
    return accelerate_launch(
        "--multi_gpu", "--num_processes", "2", "--num_machines", "2", "--machine_rank", str(machine_rank),
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), *extra,
    )  # fmt: skip


def _start_machine(machine_rank: int, port: int, env: dict, *probe_args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*_two_machine_launch(machine_rank, port), "tests/join_probe.py", *probe_args],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
    )  # fmt: skip


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_the_join_timeout_comes_from_the_environment():
    assert join_timeout({}) == DEFAULT_JOIN_TIMEOUT == 300
    assert join_timeout({"CIFAR_ACCEL_JOIN_TIMEOUT": " 12.5 "}) == 12.5


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan", "inf"])
def test_a_bad_join_timeout_is_one_line(value, monkeypatch):
    monkeypatch.setenv("CIFAR_ACCEL_JOIN_TIMEOUT", value)
    with pytest.raises(UserError, match=r"^CIFAR_ACCEL_JOIN_TIMEOUT must be a number of seconds greater than 0") as e:
        with process_group_deadline():
            pass
    assert "\n" not in str(e.value) and repr(value) in str(e.value)


@pytest.mark.parametrize("block_seconds, stopped", [(30, True), (0, False)])
def test_the_deadline_stops_only_a_block_that_overruns_it(block_seconds, stopped):
    script = textwrap.dedent(f"""
        import time
        from cifar_accel.distributed import process_group_deadline
        with process_group_deadline(0.5):
            time.sleep({block_seconds})
        time.sleep(1)  # past the deadline: a finished block is no longer watched
        print("finished")
    """)
    env = {**os.environ, "WORLD_SIZE": "4", "RANK": "3", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29555"}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    if stopped:
        assert result.returncode == 2 and time.monotonic() - start < 15 and result.stdout == ""
        assert result.stderr.splitlines() == _error_lines(result.stderr)
        [line] = result.stderr.splitlines()
        assert line.startswith("error: the process group did not form within 0.5 s: rank 3 of 4 waited for "
                               "10.0.0.7:29555 (MASTER_ADDR:MASTER_PORT)")  # fmt: skip
        assert "CIFAR_ACCEL_JOIN_TIMEOUT" in line
    else:
        assert (result.returncode, result.stdout, result.stderr) == (0, "finished\n", "")


@pytest.mark.slow
def test_a_partner_that_never_joins_stops_the_run_within_the_join_timeout():
    """The launchers meet, but machine 1's script fails before building its Accelerator: machine 0's
    process would wait 30 minutes inside ``Accelerator()``; the deadline stops it after 5 s."""
    port = _free_port()
    env = {"CIFAR_ACCEL_JOIN_TIMEOUT": "5", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    machines = [_start_machine(rank, port, env, *(["--fail-first"] if rank else [])) for rank in (0, 1)]
    try:
        stdout, stderr = machines[0].communicate(timeout=60)
        elapsed = time.monotonic() - start
        machines[1].communicate(timeout=30)
    finally:
        for machine in machines:
            machine.kill()
    assert "probe: building the Accelerator" in stdout and "joined" not in stdout
    assert machines[0].returncode != 0 and elapsed < 30, (elapsed, stderr[-2000:])
    [line] = _error_lines(stderr)  # the launcher adds its own report of the failed process after it
    assert line.startswith("error: the process group did not form within 5 s: rank 0 of 2 waited for "
                           f"127.0.0.1:{port} (MASTER_ADDR:MASTER_PORT)")  # fmt: skip
    assert "exitcode  : 2" in stderr


@pytest.mark.slow
def test_a_machine_alone_waits_in_the_launcher_bounded_by_rdzv_conf_timeout():
    """Without its partner, machine 0's launcher never starts the script (its rendezvous waits 900 s
    by default): only the launcher's ``--rdzv_conf timeout=SECONDS`` bounds that wait."""
    port = _free_port()
    start = time.monotonic()
    result = subprocess.run(
        [*_two_machine_launch(0, port, "--rdzv_conf", "timeout=3"), "tests/join_probe.py"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and time.monotonic() - start < 30
    assert "probe:" not in result.stdout  # the script never ran
    assert "waiting for clients. 1/2 clients joined" in result.stderr

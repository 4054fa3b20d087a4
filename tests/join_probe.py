"""Builds an Accelerator as ``build_accelerator`` does, inside ``process_group_deadline``.

Launched by tests/test_distributed.py as machine 0 of ``accelerate launch --num_machines 2``;
with ``--fail-first`` it plays a partner machine whose script fails before building one.
"""

import sys

from cifar_accel.cli import _run
from cifar_accel.distributed import process_group_deadline
from cifar_accel.errors import UserError


def build() -> None:
    if "--fail-first" in sys.argv:
        raise UserError("probe: this partner fails before building the Accelerator")
    from accelerate import Accelerator

    print("probe: building the Accelerator", flush=True)
    with process_group_deadline():
        accelerator = Accelerator(cpu=True)
    print(f"probe: process {accelerator.process_index} of {accelerator.num_processes} joined", flush=True)


if __name__ == "__main__":
    _run(build)

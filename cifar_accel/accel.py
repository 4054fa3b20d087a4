"""The process side of a run: its one ``Accelerator``, and work done by the main process only.

Everything distributed goes through the accelerator: ``prepare`` shards the data and wraps the model,
``gather_for_metrics`` makes evaluation exact, ``is_main_process`` decides who writes.
"""

import os
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, TorchDynamoPlugin, broadcast_object_list

from cifar_accel.config import TrainConfig
from cifar_accel.distributed import process_group_deadline
from cifar_accel.errors import UserError
from cifar_accel.files import describe_os_error
from cifar_accel.reporting import tracker_folder, tracker_names

COMPILE_BACKEND = "inductor"  # the tests count graphs with the cheaper "aot_eager"


def build_accelerator(config: TrainConfig) -> Accelerator:
    """The one Accelerator of a run.

    Under ``accelerate launch --num_processes N`` on a machine without a GPU, a default
    Accelerator treats every process as alone; asking for the CPU makes them one gloo group.
    The seedable sampler makes each epoch's order a function of (seed, epoch), so a resumed
    run draws the same batches as an uninterrupted one.
    """
    launched_with_several_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_cpu = config.cpu or (launched_with_several_processes and not torch.cuda.is_available())
    trackers = tracker_names(config.report_to)
    # Accelerate keeps one shared state per process: a second run in the same process (a notebook, a
    # benchmark) would silently keep the first one's mixed precision and compilation. The process group stays.
    AcceleratorState._reset_state()
    with process_group_deadline():  # CIFAR_ACCEL_JOIN_TIMEOUT s for the other processes to join
        accelerator = Accelerator(
            cpu=use_cpu,
            log_with=trackers or None,
            project_config=ProjectConfiguration(logging_dir=tracker_folder(config.output_dir)),
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            dynamo_plugin=TorchDynamoPlugin(backend=COMPILE_BACKEND, mode=config.compile_mode)
            if config.compile
            else None,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        )
    check_mixed_precision(accelerator.mixed_precision, accelerator.device, config.optimizer)
    if accelerator.device.type == "cuda":
        # cuDNN times its algorithms on the first batches of each shape and keeps the fastest: every
        # step of a run has the same shapes. (Its choice may differ between runs, in the last bits.)
        torch.backends.cudnn.benchmark = True
    return accelerator


def check_mixed_precision(mixed_precision: str, device: torch.device, optimizer: str) -> None:
    """Refuse what Accelerate would silently run in float32 (fp16 on a CPU) or cannot run."""
    if mixed_precision == "fp16" and optimizer == "muon":
        # The gradient scaler unscales, and checks for inf, the gradients of an optimizer's own parameters;
        # Muon's are views it makes of the filters' gradients only when it steps.
        raise UserError("--optimizer muon does not run under --mixed_precision fp16; use bf16 or no")
    if mixed_precision == "fp16" and device.type == "cpu":
        raise UserError("--mixed_precision fp16 needs a GPU; on the CPU use --mixed_precision bf16 or no")
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--mixed_precision bf16 is not supported by {torch.cuda.get_device_name()}; use fp16 or no")


def on_main_process(accelerator: Accelerator, action: Callable[[], Any]) -> Any:
    """``action()`` on the main process only; its refusal (a ``UserError`` or what the operating
    system refused) is raised on every process alike, so that none is left waiting for the others."""
    result, problem = None, None
    if accelerator.is_main_process:
        try:
            result = action()
        except UserError as error:
            problem = str(error)
        except OSError as error:
            problem = describe_os_error(error)
    if accelerator.num_processes > 1:
        shared = [problem]
        broadcast_object_list(shared)
        problem = shared[0]
    if problem:
        raise UserError(problem)
    return result

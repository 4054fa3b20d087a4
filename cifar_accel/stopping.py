"""Stopping a run on a signal, fast and at a point it can continue from.

``StopRequest`` turns SIGINT, SIGTERM and SIGUSR1 into a request the loop answers with a checkpoint.
Launchers give a stopped job only seconds before they kill it (``accelerate launch`` 5 s, torchrun's
agent 30 s, SLURM's ``KillWait``), and a step on a CPU can take longer: ``AbandonPoints`` lets a step
or an evaluation in flight end early, and ``SafePoint`` keeps what a step changes before its update
(BatchNorm statistics, random generators) as it was after the last one, so that the checkpoint
written then is the one an uninterrupted run would have written there.
"""

import random
import signal
import threading

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from cifar_accel.errors import STOP_SIGNALS, StoppedBySignal


class StopRequest:
    """SIGINT, SIGTERM and SIGUSR1 (the warning SLURM's ``--signal=USR1@SECONDS`` sends before a job's time
    runs out) stop the run in a state it can continue from, exiting 128 + the signal.

    While ``stop_at_once`` is in force (loading data, pushing: nothing to save), a signal raises
    ``StoppedBySignal`` carrying what to do next. Otherwise it is only noted: the training loop
    asks ``requested`` after each step and at each phase's end, saves a checkpoint and stops.
    Later signals are only noted, so that a second Ctrl-C cannot break the checkpoint being
    written; SIGKILL still stops at once, and then the previous checkpoint is the one to resume.
    """

    SIGNALS = STOP_SIGNALS

    def __init__(self):
        self.signal_number = 0
        self._at_once_message: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._previous = {number: signal.signal(number, self._note) for number in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def stop_at_once(self, message: str | None) -> None:
        """From now on a signal raises ``StoppedBySignal(message)``; ``None`` goes back to noting it."""
        self._at_once_message = message
        if message and self.signal_number:  # one arrived while it was only being noted
            raise StoppedBySignal(self.signal_number, message)

    def _note(self, number: int, frame) -> None:
        first = not self.signal_number
        self.signal_number = self.signal_number or number
        if first and self._at_once_message:
            raise StoppedBySignal(number, self._at_once_message)

    def requested(self, accelerator: Accelerator) -> int:
        """The signal that asked any process to stop (0 if none): the same answer on every process."""
        if accelerator.num_processes == 1:
            return self.signal_number
        numbers = accelerator.gather(torch.tensor([self.signal_number], device=accelerator.device))
        return int(numbers.max())


class StepAbandoned(Exception):
    """A stop signal ended the training step or evaluation in flight; nothing it changed is kept."""


class AbandonPoints:
    """Places inside a step where a requested stop ends it at once: before each leaf module's forward
    and after its gradient in the backward pass, never inside an optimizer update.

    A forward or backward pass is a long call into C++, and Python runs a signal's handler only between
    its own instructions; module and tensor hooks are short returns to Python inside that call. They cost
    a few microseconds per layer, nothing against a CPU step, too much for a GPU speed run, and cannot stop
    a compiled graph: ``build.build_run`` attaches them where steps are slow (``build.stops_inside_steps``).
    """

    def __init__(self, stop: "StopRequest"):
        self.stop = stop

    def attach(self, model: nn.Module) -> None:
        for module in model.modules():
            if next(module.children(), None) is None:
                module.register_forward_pre_hook(self._before_forward)
                module.register_forward_hook(self._watch_backward)

    def check(self) -> None:
        if self.stop.signal_number:
            raise StepAbandoned

    def _before_forward(self, module: nn.Module, inputs: tuple) -> None:
        self.check()

    def _watch_backward(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._after_gradient)

    def _after_gradient(self, gradient: torch.Tensor) -> None:
        self.check()


class SafePoint:
    """What a training step changes before its optimizer update, as it was after the last update.

    The forward pass moves BatchNorm's running statistics and draws from the random generators
    (dropout); the parameters, optimizer and weight averages change only in the update, which no
    abandon point interrupts. ``restore`` puts both back, so a checkpoint saved after an abandoned
    step holds the state after the last completed one.
    """

    def __init__(self, model: nn.Module):
        self.buffers = list(model.buffers())
        self.saved_buffers = [buffer.detach().clone() for buffer in self.buffers]
        self.generators: dict = {}

    @torch.no_grad()
    def mark(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.saved_buffers, self.buffers)
        self.generators = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        }

    @torch.no_grad()
    def restore(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.saved_buffers)
        random.setstate(self.generators["python"])
        np.random.set_state(self.generators["numpy"])
        torch.set_rng_state(self.generators["torch"])
        if self.generators["cuda"] is not None:
            torch.cuda.set_rng_state_all(self.generators["cuda"])

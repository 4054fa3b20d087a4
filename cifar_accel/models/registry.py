"""Model registry: every architecture is a named builder ``builder(num_classes, **kwargs)``."""

import inspect
from collections.abc import Callable

import torch
from torch import nn

from cifar_accel.errors import UserError, first_line
from cifar_accel.values import is_finite_number, is_whole_number

ModelBuilder = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(builder: ModelBuilder) -> ModelBuilder:
    """Decorator: register ``builder`` under its function name."""
    _REGISTRY[builder.__name__] = builder
    return builder


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered model.

    ``kwargs`` are the family's constructor arguments; they must be JSON-serialisable
    so that a saved ``config.json`` can rebuild the same network.
    """
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    builder = _REGISTRY[name]
    parameters = inspect.signature(builder).parameters
    accepted = set(parameters) - {"num_classes"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise UserError(
            f"model {name!r} does not take {', '.join(unknown)}; its arguments are: {', '.join(sorted(accepted))}"
        )
    for argument, value in kwargs.items():
        expected = parameters[argument].annotation
        if not _fits(value, expected):
            kind = getattr(expected, "__name__", expected)
            raise UserError(f"model argument {argument} must be a finite {kind}, got {value!r}")
    return builder(num_classes=num_classes, **kwargs)


class NotBuildable(Exception):
    """The builder raised for these arguments; the message is the first line of what it raised."""


class SideNotTaken(Exception):
    """The network cannot take images of that side; the message is the first line of what it raised."""


def check_buildable(name: str, num_classes: int, model_args: dict, side: int | None = None) -> None:
    """Build the network without memory (meta device) and, with ``side``, pass it images of that side, so that
    what cannot work is refused before any data or weights load. Raises ``UserError`` for an argument the
    builder does not take, ``NotBuildable`` for one it cannot build with, ``SideNotTaken`` for the side."""
    with torch.device("meta"):
        try:
            network = get_model(name, num_classes=num_classes, **model_args)
        except UserError:
            raise
        except Exception as error:  # whatever the constructor raises for values it cannot take
            raise NotBuildable(first_line(error)) from None
        if side is not None:  # shapes only: the head must fit what the body gives
            try:
                network.eval()(torch.zeros(2, 3, side, side))
            except Exception as error:
                raise SideNotTaken(first_line(error)) from None


def _fits(value: object, expected: object) -> bool:
    """A JSON value for a constructor argument annotated ``float`` or ``int``: finite, and not a bool."""
    if expected is float:
        return is_finite_number(value)
    if expected is int:
        return is_whole_number(value)
    return True  # other annotations (tuples, lists) are left to the constructor


def classifier_layer(network: nn.Module) -> tuple[str, nn.Linear]:
    """The layer that maps features to class scores: in every registered model, its last ``nn.Linear``."""
    linear = [(name, module) for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise UserError(f"{type(network).__name__} has no linear classifier layer")
    return linear[-1]

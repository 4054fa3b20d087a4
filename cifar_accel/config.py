"""Every training setting in one typed dataclass; the command line is generated from it.

Each field's ``help`` metadata is its one-line ``--help`` text and ``choices`` limits
its values. ``parse_train_args`` turns ``argv`` into a validated ``TrainConfig``.
"""

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from cifar_accel.errors import UserError

DATA_LOADERS = ("torch", "device")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("onecycle", "cosine", "multistep", "constant")
MIXED_PRECISION = ("no", "fp16", "bf16")
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow", "all")


def _option(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    metadata = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    recipe: str | None = _option(None, "named recipe (see 'cifar-accel recipes') or a YAML file; flags override it")
    # Data
    dataset: str = _option("uoft-cs/cifar10", "Hub dataset id, local copy in the Hub layout, or image folder")
    image_column: str | None = _option(None, "image column (default: detect 'img' or 'image')")
    label_column: str | None = _option(None, "label column (default: detect 'label' or 'fine_label')")
    train_split: str = _option("train", "split to train on")
    eval_split: str = _option("test", "split to evaluate on after every epoch")
    max_train_samples: int | None = _option(None, "use only the first N training examples")
    max_eval_samples: int | None = _option(None, "use only the first N evaluation examples")
    validation_size: int = _option(0, "hold out N training examples (stratified) to select the best epoch")
    crop_padding: int = _option(4, "random crops of 32x32 from images reflect-padded by this many pixels (0: off)")
    cutout: int = _option(0, "side in pixels of the random square erased from each training image (0: off)")
    data_loader: str = _option(
        "torch", "torch: per-image transforms in workers; device: whole split on device", DATA_LOADERS
    )
    alternating_flip: bool = _option(False, "flip a random half of the images in even epochs, the rest in odd ones")
    num_workers: int | None = _option(
        None, "DataLoader worker processes per device (default: CPU cores / processes, at most 8)"
    )
    # Model
    model: str = _option("resnet9", "architecture name (see 'cifar-accel models')")
    model_args: dict[str, Any] = _option({}, "JSON object of extra constructor arguments, e.g. '{\"dropout\": 0.3}'")
    # Optimisation
    epochs: int = _option(24, "number of passes over the training set")
    batch_size: int = _option(512, "examples per device per step; global batch = this x processes x accumulation")
    eval_batch_size: int = _option(1024, "examples per device per evaluation step")
    learning_rate: float = _option(0.4, "peak learning rate")
    weight_decay: float = _option(5e-4, "L2 weight decay (decoupled for adamw)")
    optimizer: str = _option("sgd", "optimizer", OPTIMIZERS)
    momentum: float = _option(0.9, "SGD momentum (adamw: beta1)")
    nesterov: bool = _option(True, "use Nesterov momentum with SGD")
    scheduler: str = _option("onecycle", "learning-rate schedule after warm-up", SCHEDULERS)
    warmup_fraction: float = _option(0.2, "fraction of training spent in linear warm-up from zero")
    final_lr_fraction: float = _option(0.0, "onecycle/cosine: decay to this fraction of the peak instead of zero")
    milestones: list[float] = _option([0.5, 0.75], "multistep: fractions of training where lr is multiplied by gamma")
    gamma: float = _option(0.1, "multistep: factor applied at each milestone")
    label_smoothing: float = _option(0.2, "label smoothing of the training loss")
    bias_lr_scale: float = _option(1.0, "learning-rate multiplier for BatchNorm biases (their decay is divided by it)")
    whiten_bias_epochs: int | None = _option(None, "airbench models: epochs the whitening bias trains (default: all)")
    lookahead: bool = _option(False, "every 5 steps pull the weights to an EMA of themselves (airbench's lookahead)")
    tta_level: int = _option(0, "test-time augmentation of the final evaluation: 0 none, 1 flip, 2 flip + 1-px shifts")
    gradient_accumulation_steps: int = _option(1, "steps whose gradients are summed before an update")
    # Hardware
    mixed_precision: str | None = _option(None, "mixed precision (default: the accelerate config's)", MIXED_PRECISION)
    sync_batchnorm: bool = _option(False, "synchronise BatchNorm statistics across processes")
    cpu: bool = _option(False, "train on the CPU even when an accelerator is present")
    channels_last: bool = _option(False, "NHWC memory layout for model and batches (faster convolutions on GPUs)")
    compile: bool = _option(False, "compile the model with torch.compile (through Accelerate's dynamo backend)")
    # Run
    output_dir: str = _option("output", "folder for the run's config, metrics and best model")
    overwrite_output_dir: bool = _option(False, "replace the run already in --output_dir (otherwise refused)")
    seed: int = _option(0, "random seed for initialisation, shuffling and augmentation")
    checkpointing_steps: str | None = _option(None, "save a resumable checkpoint every N steps, or every 'epoch'")
    checkpoints_total_limit: int | None = _option(None, "keep only the newest K checkpoints")
    resume_from_checkpoint: str | None = _option(None, "'latest' or a checkpoint folder: continue that run exactly")
    report_to: str = _option(
        "none", "also log every epoch to experiment trackers (tensorboard: OUTPUT_DIR/logs); all: those installed",
        REPORT_TO,
    )  # fmt: skip
    # Hub (the token comes from HF_TOKEN or `hf auth login`, never from a flag that would be saved)
    push_to_hub: bool = _option(False, "at the end, push the best model, its card and the run's records to the Hub")
    hub_model_id: str | None = _option(None, "USER/NAME of the Hub model repo for --push_to_hub")
    hub_private_repo: bool = _option(False, "create the Hub repo as private")

    def validate(self) -> None:
        """Reject values that cannot work, with the flag name and what would be valid."""
        positive = ("epochs", "batch_size", "eval_batch_size", "learning_rate", "gradient_accumulation_steps")
        for name in positive:
            if not getattr(self, name) > 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)!r}")
        for name in ("max_train_samples", "max_eval_samples", "checkpoints_total_limit"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"--{name} must be positive, got {value!r}")
        for name in ("validation_size", "crop_padding", "cutout", "num_workers", "weight_decay", "label_smoothing"):
            if (getattr(self, name) or 0) < 0:
                raise UserError(f"--{name} must be zero or positive, got {getattr(self, name)!r}")
        if self.tta_level not in (0, 1, 2):
            raise UserError(f"--tta_level must be 0, 1 or 2, got {self.tta_level!r}")
        if self.bias_lr_scale <= 0:
            raise UserError(f"--bias_lr_scale must be positive, got {self.bias_lr_scale!r}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise UserError(f"--final_lr_fraction must be between 0 and 1, got {self.final_lr_fraction!r}")
        if not 0 <= self.warmup_fraction <= 1:
            raise UserError(f"--warmup_fraction must be between 0 and 1, got {self.warmup_fraction!r}")
        if self.checkpointing_steps not in (None, "epoch") and not self.checkpoint_every_steps:
            raise UserError(
                f"--checkpointing_steps must be a positive number of steps or 'epoch', got {self.checkpointing_steps!r}"
            )
        if self.push_to_hub:
            from cifar_accel.hub import check_repo_id, resolve_token

            if not self.hub_model_id:
                raise UserError("--push_to_hub needs --hub_model_id USER/NAME")
            check_repo_id(self.hub_model_id, "--hub_model_id")
            resolve_token()  # refused now rather than after hours of training
        from cifar_accel.models import list_models

        if self.model not in list_models():
            raise UserError(f"unknown model {self.model!r}; choose one of: {', '.join(list_models())}")
        for option_name, choices in (
            ("optimizer", OPTIMIZERS),
            ("scheduler", SCHEDULERS),
            ("data_loader", DATA_LOADERS),
            ("report_to", REPORT_TO),
        ):
            if getattr(self, option_name) not in choices:
                raise UserError(
                    f"unknown --{option_name} {getattr(self, option_name)!r}; choose one of: {', '.join(choices)}"
                )
        if self.report_to != "none":
            from cifar_accel.reporting import tracker_names

            tracker_names(self.report_to)  # a missing package is refused before anything runs

    @property
    def checkpoint_every_steps(self) -> int | None:
        return int(self.checkpointing_steps) if (self.checkpointing_steps or "").isdigit() else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _parse_json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object such as '{\"dropout\": 0.3}'")
    return value


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> ``int``, ``list[float]`` -> ``list``; other annotations unchanged."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return typing.get_origin(annotation) or annotation


_METAVARS = {int: "N", float: "X", str: "TEXT"}


def _number(kind: type) -> Any:
    """``int`` or ``float`` for argparse, with an error that says what was expected."""

    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'a whole number' if kind is int else 'a number'}"
            ) from None

    return convert


class OneLineErrorParser(argparse.ArgumentParser):
    """Argument errors become a ``UserError``: one line on stderr, no usage dump."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(f"{message} (see --help)")


def _one_line_help(prog: str) -> argparse.HelpFormatter:
    """Option and its help on one line: the longest option here is about 50 characters."""
    return argparse.HelpFormatter(prog, max_help_position=56, width=176)


def add_dataclass_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One ``--name`` option per dataclass field, typed and documented from the field."""
    hints = typing.get_type_hints(config_class)
    for config_field in dataclasses.fields(config_class):
        kind = _base_type(hints[config_field.name])
        default = config_field.default
        if default is dataclasses.MISSING:
            default = config_field.default_factory()
        help_text = config_field.metadata["help"]
        if default not in (None, {}, []):
            help_text += f" (default: {default})"
        options: dict[str, Any] = {"help": help_text}  # the value itself comes from the dataclass
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif kind is list:
            options.update(type=_number(float), nargs="+", metavar="X")
        elif kind is dict:
            options.update(type=_parse_json_object, metavar="JSON")
        else:
            choices = config_field.metadata["choices"]
            if choices:
                options["help"] = f"{help_text}; one of: {', '.join(choices)}"
            converter = _number(kind) if kind in (int, float) else kind
            options.update(type=converter, choices=choices, metavar="NAME" if choices else _METAVARS[kind])
        parser.add_argument(f"--{config_field.name}", **options)


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """A recipe value converted to the setting's type, or a clear error naming both."""
    kind = _base_type(annotation)
    if value is None or kind in (dict, Any):
        return value
    try:
        if kind is list:
            return [float(item) for item in value]
        if kind is bool and not isinstance(value, bool):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"recipe setting {name}: {value!r} is not a valid {kind.__name__}") from None


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then the recipe's settings, then the flags given explicitly: later wins."""
    parser = OneLineErrorParser(
        description="Train an image classifier on CIFAR-10 (or any dataset in its layout) with Accelerate.",
        formatter_class=_one_line_help,
        argument_default=argparse.SUPPRESS,  # only flags given explicitly reach the namespace
    )
    add_dataclass_arguments(parser, TrainConfig)
    explicit = vars(parser.parse_args(argv))
    settings: dict[str, Any] = {}
    if explicit.get("recipe"):
        from cifar_accel.recipes import load_recipe

        hints = typing.get_type_hints(TrainConfig)
        recipe = load_recipe(explicit["recipe"])
        unknown = sorted(set(recipe) - set(hints))
        if unknown:
            raise UserError(f"recipe {explicit['recipe']!r} sets unknown settings: {', '.join(unknown)}")
        settings = {name: _coerce(name, value, hints[name]) for name, value in recipe.items()}
    config = TrainConfig(**{**settings, **explicit})
    config.validate()
    return config

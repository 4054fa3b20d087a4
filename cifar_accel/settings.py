"""From a command line to a ``TrainConfig``: the flags generated from the dataclass, recipes, ``--config`` replay,
the Hugging Face examples' spellings, and what ``--resume_from_checkpoint`` and ``--init_from`` bring.

``parse_train_args`` is the only way in: defaults, then a recipe or a replayed run, then the flags given
explicitly; then a checkpoint's or a base model's settings where asked; then ``TrainConfig.validate``.
"""

import argparse
import dataclasses
import json
import os
import typing
from typing import Any

from cifar_accel.config import TrainConfig, base_type, default_of, names_hub_model, settings_by_section
from cifar_accel.errors import UserError
from cifar_accel.recipes import load_recipe
from cifar_accel.run_files import RUN_CONFIG_FILE, RUN_RECORD_ONLY


def _parse_json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object such as '{\"dropout\": 0.3}'")
    return value


_METAVARS = {int: "N", float: "X", str: "TEXT"}
# Settings that steered the recorded run rather than its result: a replay starts afresh and pushes nothing.
NOT_REPLAYED = {"resume_from_checkpoint": None, "overwrite_output_dir": False, "push_to_hub": False}
# A Hub model's settings where neither a flag nor the recipe gives them: those of the transformers example that
# fine-tunes one (run_image_classification_no_trainer.py: AdamW at 5e-5, no weight decay, linear decay, 3 epochs,
# plain cross-entropy), with a 10% warm-up and a batch of 32 per device; cifar_accel's defaults train from scratch.
HUB_MODEL_DEFAULTS = {
    "optimizer": "adamw", "learning_rate": 5e-5, "weight_decay": 0.0, "epochs": 3, "label_smoothing": 0.0,
    "warmup_fraction": 0.1, "batch_size": 32, "eval_batch_size": 64,
}  # fmt: skip
# The Hugging Face examples' spellings (run_image_classification_no_trainer.py and peers), accepted as ours.
FLAG_ALIASES = {
    "dataset": ("--dataset_name",),
    "dataset_config": ("--dataset_config_name",),
    "batch_size": ("--per_device_train_batch_size",),
    "eval_batch_size": ("--per_device_eval_batch_size",),
    "epochs": ("--num_train_epochs",),
    "scheduler": ("--lr_scheduler_type",),
}


# The flags that are not settings: they say how the settings are put together, and no run records them.
PARSER_ONLY_FLAGS = {
    "--config": "a run folder or its train_config.json (replays that run), or a recipe file",
    "--with_tracking": "the Hugging Face examples' flag: --report_to all, unless --report_to is given",
}


def _number(kind: type) -> Any:
    """``int`` or ``float`` for argparse, with an error that says what was expected."""

    def convert(text: str) -> Any:
        try:
            if kind is float and text.strip().lstrip("+-").isdigit():
                return int(text)  # "--epochs 3" stays 3, as "epochs: 3" in a recipe does, in logs and refusals
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


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--name`` option per ``TrainConfig`` field, typed and documented from the field, in its ``--help``
    section."""
    hints = typing.get_type_hints(TrainConfig)
    for title, section in settings_by_section().items():
        group = parser.add_argument_group(title)
        for setting in section:
            group.add_argument(
                f"--{setting.name}", *FLAG_ALIASES.get(setting.name, ()), dest=setting.name,
                **_argument_options(setting, base_type(hints[setting.name])),
            )  # fmt: skip


def _argument_options(setting: dataclasses.Field, kind: type) -> dict[str, Any]:
    default = default_of(setting)
    help_text = setting.metadata["help"]
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
        choices = setting.metadata["choices"]
        if choices:
            options["help"] = f"{help_text}; one of: {', '.join(choices)}"
        converter = _number(kind) if kind in (int, float) else kind
        options.update(type=converter, choices=choices, metavar="NAME" if choices else _METAVARS[kind])
    return options


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """A recipe value converted to the setting's type, or a clear error naming both."""
    kind = base_type(annotation)
    if kind is dict and isinstance(value, str):  # the JSON text the command line takes, quoted in YAML
        try:
            return _parse_json_object(value)
        except argparse.ArgumentTypeError as error:
            raise UserError(f"--{name} must be a JSON object: {error}") from None
    if value is None or kind in (dict, Any):
        return value
    try:
        if kind is list:
            return [_coerce(name, item, float) for item in value]
        if isinstance(value, bool) and kind is not bool or kind is bool and not isinstance(value, bool):
            raise ValueError
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError  # int(2.5) would silently train 2 epochs
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        hint = " (YAML reads a bare no/yes/on/off as false/true: quote the word)" if isinstance(value, bool) else ""
        raise UserError(f"recipe setting {name}: {value!r} is not a valid {kind.__name__}{hint}") from None


def _settings_file(name_or_path: str, replay: bool) -> dict[str, Any]:
    """A recipe's settings, typed; with ``--config`` also a finished run's ``train_config.json`` (or its folder),
    less what the run derived and what only steered that run (where to resume from, whether to push)."""
    path = os.path.join(name_or_path, RUN_CONFIG_FILE) if replay and os.path.isdir(name_or_path) else name_or_path
    if replay and not os.path.isfile(path):
        raise UserError(f"--config {name_or_path}: no such file; give a run folder, its {RUN_CONFIG_FILE} or a recipe")
    try:
        settings = load_recipe(path)
    except UserError as error:  # its messages name a recipe
        raise UserError(str(error).replace("recipe ", "--config ", 1) if replay else str(error)) from None
    if replay and "environment" in settings:  # a run's record, not a recipe
        settings = {name: value for name, value in settings.items() if name not in RUN_RECORD_ONLY}
        settings.update(NOT_REPLAYED)
    hints = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(settings) - set(hints))
    if unknown:
        source = f"--config {name_or_path}" if replay else f"recipe {name_or_path!r}"
        raise UserError(f"{source} sets unknown settings: {', '.join(unknown)}")
    return {name: _coerce(name, value, hints[name]) for name, value in settings.items()}


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then the recipe's settings, then the flags given explicitly: later wins.

    With ``--resume_from_checkpoint``, the checkpoint's run settings come first instead, and what
    was asked for may change only what does not change the result (``checkpoint.RESUME_MAY_CHANGE``).
    """
    parser = OneLineErrorParser(
        description="Train an image classifier on CIFAR-10 (or any dataset in its layout) with Accelerate.",
        formatter_class=_one_line_help,
        argument_default=argparse.SUPPRESS,  # only flags given explicitly reach the namespace
    )
    add_train_arguments(parser)
    parser.add_argument("--config", metavar="PATH", help=PARSER_ONLY_FLAGS["--config"])
    parser.add_argument("--with_tracking", action="store_true", help=PARSER_ONLY_FLAGS["--with_tracking"])
    explicit = vars(parser.parse_args(argv))
    if explicit.pop("with_tracking", False):
        explicit.setdefault("report_to", "all")
    config_file = explicit.pop("config", None)
    if config_file and explicit.get("recipe"):
        raise UserError("--config and --recipe both set the starting settings; give one (flags override either)")
    settings: dict[str, Any] = {}
    if config_file or explicit.get("recipe"):
        settings = _settings_file(config_file or explicit["recipe"], replay=bool(config_file))
    settings.update(explicit)
    # Imported here, not above, for start-up time: --help and a mistyped flag answer before torch is loaded.
    from cifar_accel.checkpoint import resume_settings
    from cifar_accel.finetune import architecture_settings

    if settings.get("resume_from_checkpoint"):
        saved = resume_settings(settings, TrainConfig.output_dir)
        settings = {name: value for name, value in saved.items() if name in typing.get_type_hints(TrainConfig)}
    elif settings.get("init_from"):
        settings = architecture_settings(settings)
    if names_hub_model(settings.get("model", ""), settings.get("model_name_or_path")):
        settings = {**HUB_MODEL_DEFAULTS, **settings}
    config = TrainConfig(**settings)
    config.validate()
    return config

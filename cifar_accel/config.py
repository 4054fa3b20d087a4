"""Every training setting in one typed dataclass, with what each may be: the bottom of the package.

Each field's ``help`` metadata is its one-line ``--help`` text and ``choices`` limits its values;
``RANGES`` holds the valid numbers and ``SECTIONS`` the ``--help`` sections. ``TrainConfig.validate``
looks at the values only. The command line is generated from the dataclass in ``settings``; the checks that
touch the disk, the installed packages or the Hub are ``preflight``'s. This module imports nothing of the
package but ``errors`` and ``values``.
"""

import dataclasses
import itertools
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cifar_accel.errors import UserError
from cifar_accel.values import parse_seeds

DATA_LOADERS = ("torch", "device")
OPTIMIZERS = ("sgd", "adamw", "muon")
SCHEDULERS = ("linear", "cosine", "multistep", "constant")
# Still accepted: "onecycle" is what the Hugging Face schedulers call "linear" (warm-up, then linear decay).
SCHEDULER_ALIASES = {"onecycle": "linear"}
MIXED_PRECISION = ("no", "fp16", "bf16")
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow", "all")
EVAL_STRATEGIES = ("epoch", "no")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
AUTO_AUGMENT = ("cifar10", "randaugment", "trivialaugment", "augmix")
IMAGE_SIDE = 32  # without --image_size, images must have this side
# --model spellings of a timm checkpoint (timm's own, plus timm/NAME for hf-hub:timm/NAME); see zoo.source.
TIMM_MODEL_PREFIXES = ("timm/", "hf-hub:", "local-dir:")

# setting: (test of a valid value, what is valid); a None value means "not set" and is not tested.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epochs": (lambda value: 0 < value <= 10**6, "more than 0 and at most a million"),
    "eval_epochs": (lambda value: value >= 1, "at least 1"),
    "max_train_steps": (lambda value: 1 <= value <= 2**31, "1 to 2^31"),
    "num_warmup_steps": (lambda value: 0 <= value <= 2**31, "0 to 2^31"),
    "batch_size": (lambda value: 1 <= value <= 2**31, "1 to 2^31"),
    "eval_batch_size": (lambda value: 1 <= value <= 2**31, "1 to 2^31"),
    "gradient_accumulation_steps": (lambda value: 1 <= value <= 2**31, "1 to 2^31"),
    "max_train_samples": (lambda value: value >= 1, "at least 1"),
    "max_eval_samples": (lambda value: value >= 1, "at least 1"),
    "checkpoints_total_limit": (lambda value: value >= 1, "at least 1"),
    "validation_size": (lambda value: value >= 0, "zero or more"),
    "whiten_bias_epochs": (lambda value: value >= 0, "zero or more"),
    "num_workers": (lambda value: 0 <= value <= 64, "0 to 64"),
    "seed": (lambda value: 0 <= value < 2**32, "in [0, 2^32)"),
    "learning_rate": (lambda value: 0 < value < math.inf, "a positive finite number"),
    "weight_decay": (lambda value: 0 <= value < math.inf, "zero or a positive finite number"),
    "bias_lr_scale": (lambda value: 0 < value < math.inf, "a positive finite number"),
    "whiten_bias_lr_scale": (lambda value: 0 < value < math.inf, "a positive finite number"),
    "muon_learning_rate": (lambda value: 0 < value < math.inf, "a positive finite number"),
    "muon_momentum": (lambda value: 0 <= value < 1, "in [0, 1)"),
    "gamma": (lambda value: 0 < value < math.inf, "a positive finite number"),
    "momentum": (lambda value: 0 <= value < 1, "in [0, 1)"),
    "label_smoothing": (lambda value: 0 <= value < 1, "in [0, 1)"),
    "warmup_fraction": (lambda value: 0 <= value <= 1, "in [0, 1]"),
    "warmup_start_fraction": (lambda value: 0 <= value <= 1, "in [0, 1]"),
    "final_lr_fraction": (lambda value: 0 <= value <= 1, "in [0, 1]"),
    "tta_level": (lambda value: value in (0, 1, 2), "0, 1 or 2"),
    "image_size": (lambda value: 8 <= value <= 256, "8 to 256 pixels (small images)"),
    "random_erasing": (lambda value: 0 <= value <= 1, "a probability in [0, 1]"),
    "mixup": (lambda value: 0 <= value < math.inf, "0 (off) or a positive finite alpha"),
    "cutmix": (lambda value: 0 <= value < math.inf, "0 (off) or a positive finite alpha"),
    "model_ema": (lambda value: 0 <= value < 1, "0 (off) or a decay in (0, 1)"),
    "max_grad_norm": (lambda value: 0 < value < math.inf, "a positive finite number"),
    "layer_decay": (lambda value: 0 < value <= 1, "in (0, 1]"),
    "head_lr_scale": (lambda value: 0 < value < math.inf, "a positive finite number"),
    "target_accuracy": (lambda value: 0 < value < 1, "a fraction in (0, 1), such as 0.94"),
}
# Settings that training uses as float32 (tensors, or scalars cast to the weights' dtype): a value outside
# float32's normal range becomes 0 or infinite there (a Beta of alpha 0 raises; a learning rate of 0 trains nothing).
FLOAT32_SETTINGS = ("learning_rate", "muon_learning_rate", "max_grad_norm", "mixup", "cutmix")
FLOAT32_TINY = 2.0**-126  # the smallest normal float32
FLOAT32_MAX = (2 - 2.0**-23) * 2.0**127


# The --help sections (and the flag reference's): each begins at the named field and runs to the next one's.
SECTIONS = (
    ("Recipe", "recipe"), ("Data", "dataset"), ("Augmentation", "crop_padding"), ("Model", "model"),
    ("Optimisation", "epochs"), ("Evaluation", "tta_level"), ("Hardware", "mixed_precision"), ("Run", "output_dir"),
    ("Hub", "push_to_hub"),
)  # fmt: skip


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
    dataset_config: str | None = _option(None, "the dataset's config, for one with several (SVHN: cropped_digits)")
    image_column: str | None = _option(None, "image column (default: detect 'img' or 'image')")
    label_column: str | None = _option(None, "label column (default: detect 'label' or 'fine_label')")
    train_split: str = _option("train", "split to train on")
    eval_split: str = _option("test", "split to evaluate on after every epoch")
    max_train_samples: int | None = _option(None, "train on N examples drawn at random (seed 0, the same every run)")
    max_eval_samples: int | None = _option(None, "evaluate on N examples drawn at random (seed 0, the same every run)")
    validation_size: int = _option(0, "hold out N training examples (stratified) to select the best epoch")
    image_size: int | None = _option(
        None, "resize images of any other size to NxN on load (default: 32x32 only); Hub models: their input size"
    )
    data_loader: str = _option(
        "torch", "torch: per-image transforms in workers; device: whole split on device", DATA_LOADERS
    )
    drop_last: bool = _option(False, "drop each epoch's last incomplete training batch (same-shaped steps)")
    num_workers: int | None = _option(
        None, "DataLoader worker processes per device (default: CPU cores / processes, at most 8)"
    )
    crop_padding: int = _option(4, "random crops of NxN from images reflect-padded by this many pixels (0: off)")
    cutout: int = _option(0, "side in pixels of the random square erased from each training image (0: off)")
    auto_augment: str | None = _option(
        None, "torch loader: a learned/random policy per training image (cifar10: AutoAugment's CIFAR-10 policy)",
        (*AUTO_AUGMENT, "none"),
    )  # fmt: skip
    random_erasing: float = _option(0.0, "torch loader: probability of erasing a random rectangle (v2 RandomErasing)")
    mixup: float = _option(0.0, "alpha of v2 MixUp on each training batch, trained on the soft targets (0: off)")
    cutmix: float = _option(0.0, "alpha of v2 CutMix on each training batch; with --mixup, one of the two per batch")
    alternating_flip: bool = _option(False, "flip a random half of the images in even epochs, the rest in odd ones")
    # Model
    model: str = _option(
        "resnet9",
        "architecture name (see 'cifar-accel models'), or a timm model: timm/NAME, hf-hub:REPO, local-dir:PATH",
    )
    model_name_or_path: str | None = _option(
        None, "a transformers image classifier to fine-tune: Hub repo id or folder (AutoModelForImageClassification)"
    )
    model_revision: str | None = _option(None, "a Hub model's branch, tag or commit")
    pretrained: bool = _option(True, "a Hub model starts from its published weights (--no-pretrained: random ones)")
    init_from: str | None = _option(
        None, "start from a saved model (a run's best/ folder or a Hub repo id); it sets --model and --model_args"
    )
    init_revision: str | None = _option(None, "with --init_from a Hub repo: its branch, tag or commit")
    freeze_backbone: bool = _option(
        False, "with --init_from or a Hub model: train only the classifier layer (linear probing)"
    )
    model_args: dict[str, Any] = _option({}, "JSON object of extra constructor arguments, e.g. '{\"dropout\": 0.3}'")
    # Optimisation
    epochs: float = _option(24, "passes over the training set; a fraction stops the last one early (9.9)")
    max_train_steps: int | None = _option(None, "train this many optimizer updates instead of --epochs")
    batch_size: int = _option(512, "examples per device per step; global batch = this x processes x accumulation")
    eval_batch_size: int = _option(1024, "examples per device per evaluation step")
    learning_rate: float = _option(0.4, "peak learning rate")
    weight_decay: float = _option(5e-4, "L2 weight decay (decoupled for adamw; muon keeps conv filters at a set norm)")
    optimizer: str = _option("sgd", "optimizer (muon: Muon for the conv filters, SGD for the rest)", OPTIMIZERS)
    momentum: float = _option(0.9, "SGD momentum (adamw: beta1)")
    nesterov: bool = _option(True, "use Nesterov momentum with SGD (and Muon)")
    muon_learning_rate: float = _option(0.24, "--optimizer muon: learning rate of the conv filters")
    muon_momentum: float = _option(0.6, "--optimizer muon: momentum of the conv filters")
    scheduler: str = _option(
        "linear",
        "learning-rate schedule after warm-up (onecycle: the same as linear)",
        (*SCHEDULERS, *SCHEDULER_ALIASES),
    )
    warmup_fraction: float = _option(0.2, "fraction of training spent in linear warm-up")
    num_warmup_steps: int | None = _option(None, "optimizer updates of linear warm-up (instead of --warmup_fraction)")
    warmup_start_fraction: float = _option(0.0, "warm-up starts at this fraction of the peak learning rate")
    final_lr_fraction: float = _option(0.0, "linear/cosine: decay to this fraction of the peak instead of zero")
    milestones: list[float] = _option([0.5, 0.75], "multistep: fractions of training where lr is multiplied by gamma")
    gamma: float = _option(0.1, "multistep: factor applied at each milestone")
    label_smoothing: float = _option(0.2, "label smoothing of the training loss")
    bias_lr_scale: float = _option(1.0, "learning-rate multiplier for BatchNorm biases (their decay is divided by it)")
    whiten_bias_epochs: int | None = _option(None, "airbench models: epochs the whitening bias trains (default: all)")
    whiten_bias_lr_scale: float = _option(1.0, "learning-rate multiplier for the whitening bias (decay divided by it)")
    layer_decay: float | None = _option(
        None, "Hub models: each layer's learning rate is this times the next one's, the head's the peak (timm's)"
    )
    head_lr_scale: float = _option(1.0, "Hub models: learning-rate multiplier of the classifier layer")
    whiten_bias_decay: bool = _option(
        False, "the whitening bias's learning rate falls straight to 0 over --whiten_bias_epochs (airbench94_muon)"
    )
    max_grad_norm: float | None = _option(None, "clip the gradients' total norm to this before each update")
    model_ema: float = _option(
        0.0, "decay of a moving average of the weights, evaluated beside them; the better is kept (0: off)"
    )
    lookahead: bool = _option(False, "every 5 steps pull the weights to an EMA of themselves (airbench's lookahead)")
    gradient_accumulation_steps: int = _option(1, "steps whose gradients are summed before an update")
    tta_level: int = _option(0, "test-time augmentation of the final evaluation: 0 none, 1 flip, 2 flip + 1-px shifts")
    eval_strategy: str = _option(
        "epoch", "epoch: evaluate every --eval_epochs epochs and keep the best; no: only the last model, at the end",
        EVAL_STRATEGIES,
    )  # fmt: skip
    eval_epochs: int = _option(1, "with --eval_strategy epoch: evaluate every N epochs (and after the last)")
    # Hardware
    mixed_precision: str | None = _option(None, "mixed precision (default: the accelerate config's)", MIXED_PRECISION)
    sync_batchnorm: bool = _option(False, "synchronise BatchNorm statistics across processes")
    cpu: bool = _option(False, "train on the CPU even when an accelerator is present")
    channels_last: bool = _option(False, "NHWC memory layout for model and batches (faster convolutions on GPUs)")
    compile: bool = _option(False, "compile the model with torch.compile (through Accelerate's dynamo backend)")
    compile_mode: str = _option("default", "torch.compile mode with --compile", COMPILE_MODES)
    # Run
    output_dir: str = _option("output", "folder for the run's config, metrics and best model")
    overwrite_output_dir: bool = _option(False, "replace the run already in --output_dir (otherwise refused)")
    seed: int = _option(0, "random seed for initialisation, shuffling and augmentation")
    seeds: str | None = _option(None, "one run per seed (0-9, or 0,3,7) in OUTPUT_DIR/seed_N, summarised in seeds.json")
    target_accuracy: float | None = _option(None, "with --seeds: test whether the mean top-1 exceeds this (e.g. 0.94)")
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

    def __post_init__(self):
        if isinstance(self.epochs, float) and self.epochs.is_integer():
            self.epochs = int(self.epochs)  # "10 epochs", not "10.0", in logs and saved settings
        if isinstance(self.output_dir, str) and self.output_dir.strip():  # '--output_dir=~/runs': no shell expands it
            self.output_dir = os.path.expanduser(self.output_dir)
        if self.auto_augment == "none":  # turns off a recipe's policy
            self.auto_augment = None
        self.scheduler = SCHEDULER_ALIASES.get(self.scheduler, self.scheduler)

    def validate(self) -> None:
        """Reject values that cannot work or make no sense, naming the flag and what is valid.

        Nothing is written here: a refused run leaves the disk as it was.
        """
        self._check_types()
        for name, (is_valid, valid) in RANGES.items():
            value = getattr(self, name)
            if value is not None and not is_valid(value):
                raise UserError(f"--{name} must be {valid}, got {value!r}")
        for name in FLOAT32_SETTINGS:
            value = getattr(self, name)
            if value and value < FLOAT32_TINY:  # 0 turns --mixup and --cutmix off: it is not refused
                raise UserError(
                    f"--{name} must be at least {FLOAT32_TINY:.5g} (the smallest normal float32, the precision "
                    f"training uses), got {value!r}"
                )
            if value and value > FLOAT32_MAX:
                raise UserError(f"--{name} must be at most {FLOAT32_MAX:.5g} (the largest float32), got {value!r}")
        # Reflect padding needs fewer pixels than the side; a square as large as the image erases all of it.
        for name, valid in (("crop_padding", "less than the image side"), ("cutout", "smaller than the image")):
            if not 0 <= getattr(self, name) < self.image_side:
                raise UserError(f"--{name} must be 0 to {self.image_side - 1} ({valid}), got {getattr(self, name)!r}")
        increasing = all(earlier < later for earlier, later in itertools.pairwise(self.milestones))
        if any(not 0 < milestone < 1 for milestone in self.milestones) or not increasing:
            raise UserError(f"--milestones must be increasing fractions of training in (0, 1), got {self.milestones}")
        if self.checkpointing_steps not in (None, "epoch") and not self.checkpoint_every_steps:
            raise UserError(
                f"--checkpointing_steps must be a positive number of steps or 'epoch', got {self.checkpointing_steps!r}"
            )
        for option_name, choices in (
            ("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS), ("data_loader", DATA_LOADERS),
            ("report_to", REPORT_TO), ("mixed_precision", (*MIXED_PRECISION, None)), ("eval_strategy", EVAL_STRATEGIES),
            ("compile_mode", COMPILE_MODES), ("auto_augment", (*AUTO_AUGMENT, None)),
        ):  # fmt: skip
            if getattr(self, option_name) not in choices:
                raise UserError(
                    f"unknown --{option_name} {getattr(self, option_name)!r}; "
                    f"choose one of: {', '.join(choice for choice in choices if choice)}"
                )
        if self.eval_strategy == "no" and self.validation_size:
            raise UserError("--validation_size selects the best epoch; with --eval_strategy no nothing is selected")
        if self.compile_mode != "default" and not self.compile:
            raise UserError(f"--compile_mode {self.compile_mode} needs --compile")
        self._check_optimizer_settings()
        self._check_model_source()
        if self.data_loader == "device" and (self.auto_augment or self.random_erasing):
            flag = "--auto_augment" if self.auto_augment else "--random_erasing"
            raise UserError(f"{flag} runs per image in the torch loader's workers; use --data_loader torch")
        if not self.dataset.strip():
            raise UserError("--dataset must name a Hub dataset or a folder, got an empty string")
        if self.resume_from_checkpoint is not None and not self.resume_from_checkpoint.strip():
            raise UserError("--resume_from_checkpoint must be 'latest' or a checkpoint folder, got an empty string")
        try:
            self.seeds is None or parse_seeds(self.seeds)
        except ValueError as error:
            raise UserError(f"--seeds {self.seeds!r}: {error}") from None
        if self.target_accuracy is not None and not self.seeds:
            raise UserError("--target_accuracy tests the mean of several runs: give --seeds as well")
        if self.push_to_hub and not self.hub_model_id:
            raise UserError("--push_to_hub needs --hub_model_id USER/NAME")

    def _check_optimizer_settings(self) -> None:
        """Settings that another choice would silently ignore are refused."""
        defaults = TrainConfig.__dataclass_fields__
        for name in ("muon_learning_rate", "muon_momentum"):
            if self.optimizer != "muon" and getattr(self, name) != defaults[name].default:
                raise UserError(f"--{name} applies to --optimizer muon, not {self.optimizer}")
        if self.whiten_bias_decay and self.whiten_bias_epochs is None:
            raise UserError("--whiten_bias_decay needs --whiten_bias_epochs: the epochs over which it falls to 0")

    def _check_model_source(self) -> None:
        """The settings of one kind of model (cifar_accel's own, a saved one, a Hub model) are refused with another."""
        if self.model_name_or_path is not None and not self.model_name_or_path.strip():
            raise UserError("--model_name_or_path must name a Hub repo or a folder, got an empty string")
        if self.model_name_or_path and self.model != default_of(TrainConfig.__dataclass_fields__["model"]):
            raise UserError(f"--model {self.model} and --model_name_or_path name two models: give one")
        if self.init_revision and not self.init_from:
            raise UserError("--init_revision needs --init_from: the saved model to start from")
        if self.uses_hub_model and self.init_from:
            raise UserError("--init_from starts from a cifar_accel model; a Hub model starts from its own weights")
        hub_only = {"model_revision": self.model_revision, "pretrained": not self.pretrained,
                    "layer_decay": self.layer_decay, "head_lr_scale": self.head_lr_scale != 1}  # fmt: skip
        for name, given in hub_only.items():
            if given and not self.uses_hub_model:
                raise UserError(f"--{name} is for Hub models (--model timm/NAME, --model_name_or_path ...)")
        if self.freeze_backbone and not (self.init_from or self.uses_hub_model):
            raise UserError("--freeze_backbone needs weights to keep: --init_from, or a Hub model")

    def _check_types(self) -> None:
        """Settings from a recipe, a saved config or Python code have the type their flag would give."""
        for name, annotation in typing.get_type_hints(TrainConfig).items():
            value, kind = getattr(self, name), base_type(annotation)
            optional = type(None) in typing.get_args(annotation)
            if (value is None and optional) or kind is Any or _is_instance(value, kind):
                continue
            expected = {int: "a whole number", float: "a number", bool: "true or false", str: "text",
                        list: "a list of numbers", dict: "a JSON object"}[kind]  # fmt: skip
            raise UserError(f"--{name} must be {expected}, got {value!r}")

    @property
    def uses_hub_model(self) -> bool:
        """A timm or transformers model (``zoo``), rather than one of cifar_accel's own."""
        return names_hub_model(self.model, self.model_name_or_path)

    @property
    def resize_on_load(self) -> int | None:
        """The side images are resized to when decoded: a Hub model resizes them itself, on the accelerator."""
        return None if self.uses_hub_model else self.image_size

    @property
    def image_side(self) -> int:
        """The side of the images the loaders crop, flip and cut out."""
        return self.resize_on_load or IMAGE_SIDE

    @property
    def epoch_count(self) -> int:
        """Epochs begun: a fractional ``epochs`` stops the last of them early."""
        return math.ceil(self.epochs)

    def evaluates_after(self, epoch: int) -> bool:
        """Whether the model is evaluated after this epoch, and kept if it is the best so far."""
        return self.eval_strategy == "epoch" and (epoch % self.eval_epochs == 0 or epoch == self.epoch_count)

    @property
    def checkpoint_every_steps(self) -> int | None:
        steps = self.checkpointing_steps or ""
        # str.isdigit alone takes '²' (which int() refuses) and other scripts' digits (which int() reads).
        return int(steps) if steps.isascii() and steps.isdigit() else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def names_hub_model(model: str, model_name_or_path: str | None) -> bool:
    """Whether ``--model`` and ``--model_name_or_path`` name a timm or transformers model."""
    return bool(model_name_or_path) or model.startswith(TIMM_MODEL_PREFIXES)


def default_of(setting: dataclasses.Field) -> Any:
    """A ``TrainConfig`` field's default value (a fresh copy for a list or dict)."""
    return setting.default_factory() if setting.default is dataclasses.MISSING else setting.default


def settings_by_section() -> dict[str, list[dataclasses.Field]]:
    """``TrainConfig``'s fields under their ``SECTIONS`` title, in field order."""
    starts = {first: title for title, first in SECTIONS}
    sections: dict[str, list[dataclasses.Field]] = {}
    title = SECTIONS[0][0]
    for setting in dataclasses.fields(TrainConfig):
        title = starts.get(setting.name, title)
        sections.setdefault(title, []).append(setting)
    return sections


def _is_instance(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is list:
        return isinstance(value, list) and all(_is_instance(item, float) for item in value)
    return isinstance(value, kind)


def base_type(annotation: Any) -> Any:
    """``int | None`` -> ``int``, ``list[float]`` -> ``list``; other annotations unchanged."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return typing.get_origin(annotation) or annotation

"""Model cards (``README.md``) written with ``huggingface_hub``'s ``ModelCard`` and ``ModelCardData``.

``build_model_card(run_dir)`` reads a finished run folder: the YAML metadata carries a
``model-index`` with the evaluated top-1 accuracy; the body has the results, the recipe,
hardware and time, the training curves and a usage snippet that downloads and predicts.
"""

import importlib.metadata
import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from cifar_accel import __version__
from cifar_accel.run_files import BEST_MODEL_FOLDER, CONFUSION_PLOT, CURVES_PLOT, PLOTS_FOLDER, RESULTS_FILE
from cifar_accel.run_records import read_finished_run, require_fields
from cifar_accel.saved_model import read_model_config
from cifar_accel.zoo import CIFAR_ACCEL, TIMM, folder_summary, saved_library

LIBRARY_NAME = "cifar-accel"
# The last two are those huggingface_hub's PyTorchModelHubMixin gives the cards it writes, kept in ours.
TAGS = ("image-classification", LIBRARY_NAME, "model_hub_mixin", "pytorch_model_hub_mixin")
# The settings a reader needs to judge and repeat a run; the card links train_config.json for the rest.
KEY_SETTINGS = (
    "recipe", "model", "model_name_or_path", "model_revision", "pretrained", "model_args", "image_size", "epochs",
    "global_batch_size", "optimizer", "learning_rate",
    "weight_decay", "momentum", "scheduler", "warmup_fraction", "warmup_start_fraction", "final_lr_fraction",
    "label_smoothing", "crop_padding", "cutout", "auto_augment", "random_erasing", "mixup", "cutmix",
    "alternating_flip", "drop_last", "lookahead", "model_ema", "max_grad_norm", "mixed_precision", "eval_strategy",
    "eval_epochs",
    "max_train_samples", "max_eval_samples", "validation_size", "seed", "init_from", "init_revision",
    "freeze_backbone", "layer_decay", "head_lr_scale",
)  # fmt: skip

# Regularisers most runs do not use: a row only when they are on.
SHOWN_ONLY_WHEN_ON = ("random_erasing", "mixup", "cutmix", "model_ema")
# The fields of results.json the card shows (tta_metrics too, when the run has them).
CARD_RESULTS = (
    "selected_by", "best_epoch", "final_metrics.split", "final_metrics.n", "final_metrics.loss", "final_metrics.top1",
    "final_metrics.top3", "final_metrics.top5", "final_metrics.per_class_top1", "timing.total_seconds",
    "timing.speed_run_seconds", "timing.images_per_second",
)  # fmt: skip


def _install_line() -> str:
    """How to install the cifar_accel that wrote the card: from the repository its packaging names (setup.cfg's
    ``project_urls``), or, where it names none, from a checkout of its source at this version."""
    try:
        metadata = importlib.metadata.metadata("cifar-accel")
        urls = dict(entry.split(", ", 1) for entry in metadata.get_all("Project-URL") or [] if ", " in entry)
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        urls = {}
    repository = urls.get("Repository") or urls.get("Source")
    if repository:
        install = f'`pip install "cifar-accel @ git+{repository}"`'
        return f"Install cifar_accel from {repository} ({install}; this card was written by version {__version__})."
    return f"Install cifar_accel {__version__}: `pip install -e .` in a checkout of its source at that version."


def _usage(model_reference: str, library: str = CIFAR_ACCEL) -> str:
    """How to load and use the model: with cifar_accel, or with its own library (a Hub model's run)."""
    if library != CIFAR_ACCEL:
        return _library_usage(library, model_reference)
    return f"""## Usage

{_install_line()} Then:

```python
from PIL import Image
from cifar_accel import load_model

model = load_model("{model_reference}")  # a Hub repo is downloaded once, into the Hugging Face cache
print(model.predict(Image.open("cat.png"), top_k=3))  # [{{'label': ..., 'score': ...}}, ...], most likely first
```

or from the shell: `cifar-accel predict --model {model_reference} cat.png`
"""


def _library_usage(library: str, model_reference: str) -> str:
    """How a timm or transformers user loads the model with their own library: no cifar_accel needed."""
    if library == TIMM:
        hub_name = (
            f"hf-hub:{model_reference}" if not model_reference.startswith("/") else f"local-dir:{model_reference}"
        )
        code = f"""import timm
from PIL import Image

model = timm.create_model("{hub_name}", pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))  # the preprocessing trained with
probabilities = model(transform(Image.open("cat.png").convert("RGB"))[None]).softmax(dim=1)
print(model.pretrained_cfg["label_names"][probabilities.argmax()])"""
    else:
        code = f"""from transformers import pipeline

classifier = pipeline("image-classification", model="{model_reference}")
print(classifier("cat.png"))  # [{{'label': ..., 'score': ...}}, ...], most likely first"""
    return f"""## Usage

With {library} alone, in the library's own format:

```python
{code}
```

or with cifar_accel: `cifar-accel predict --model {model_reference} cat.png`
"""


def _library_metadata(library: str) -> tuple[str, list[str]]:
    """The card's ``library_name`` and tags: the Hub shows a timm or transformers model's own loading code."""
    if library == CIFAR_ACCEL:
        return LIBRARY_NAME, [*TAGS]
    return library, ["image-classification", LIBRARY_NAME, library]


def _card(card_data: ModelCardData, body: str) -> ModelCard:
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


def minimal_model_card(config: dict, model_reference: str = "PATH_OR_REPO_ID") -> ModelCard:
    """The card of a model saved outside a training run: what it is and how to use it (a Hub model's, with its
    library)."""
    library = config.get("library", CIFAR_ACCEL)
    library_name, tags = _library_metadata(library)
    card_data = ModelCardData(library_name=library_name, pipeline_tag="image-classification", tags=tags)
    classes = ", ".join(config["class_names"])
    body = f"# {config['architecture']}\n\nClasses ({config['num_classes']}): {classes}.\n\n"
    body += _usage(model_reference, library)
    return _card(card_data, body)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"  # None: a class with no examples in the split


def _results_section(results: dict, dataset_name: str) -> str:
    final = results["final_metrics"]
    rows = [
        f"| top-1 accuracy | {_percent(final['top1'])} |",
        f"| top-3 accuracy | {_percent(final['top3'])} |",
        f"| top-5 accuracy | {_percent(final['top5'])} |",
        f"| loss | {final['loss']:.4f} |",
    ]
    if "tta_metrics" in results:
        rows.append(f"| top-1 with test-time augmentation (level {results['tta_level']}) | "
                    f"{_percent(results['tta_metrics']['top1'])} |")  # fmt: skip
    per_class = "\n".join(f"| {name} | {_percent(value)} |" for name, value in final["per_class_top1"].items())
    return f"""## Results

The saved model on the `{final["split"]}` split of `{dataset_name}` ({final["n"]:,} images), evaluated at
the end of training by the code of `cifar-accel evaluate` (`results.json`, `final_metrics`):

| metric | value |
|---|---|
{chr(10).join(rows)}

Per-class top-1 accuracy:

| class | top-1 |
|---|---|
{per_class}
"""


def _training_section(settings: dict, results: dict) -> str:
    hub_model = settings.get("hub_model")
    unused = {"model"} if settings.get("model_name_or_path") else set()  # its default, when transformers' is trained
    if not hub_model:
        unused |= {"pretrained", "head_lr_scale"}  # meaningless for cifar_accel's own models
    shown = [
        name
        for name in KEY_SETTINGS
        if name not in unused
        and settings.get(name) not in (None, {})
        and (settings[name] or name not in SHOWN_ONLY_WHEN_ON)
    ]
    rows = "\n".join(f"| `{name}` | `{json.dumps(settings[name])}` |" for name in shown)
    if results["selected_by"] == "last":
        selection = f"The model is the last epoch's ({results['best_epoch']}); no epoch was selected."
    else:
        selection_note = ""
        if results["selected_by"] == results["final_metrics"]["split"]:
            selection_note = " (no validation hold-out: the results above are of the epoch that split chose)"
        chosen_on = results["selected_by"]
        selection = f"The best epoch ({results['best_epoch']}) was chosen on the `{chosen_on}` split{selection_note}."
    if results.get("selected_weights") == "ema":
        selection += " The weights are the moving average of the trained weights (`model_ema`)" + (
            ", which scored higher than the trained weights themselves." if results["selected_by"] != "last" else "."
        )
    environment, timing = settings["environment"], results["timing"]
    libraries = ("cifar_accel", "torch", "accelerate", "datasets", "timm", "transformers")
    versions = ", ".join(f"{name} {environment[name]}" for name in libraries if name in environment)
    return f"""## Training

Trained with `cifar-accel train`; every setting is in `train_config.json` and every epoch in `metrics.jsonl`.
{selection}

| setting | value |
|---|---|
{rows}

Hardware and time: {settings["num_processes"]} process(es) on {environment["device"]}, {timing["total_seconds"]:.0f} s
in all ({timing["speed_run_seconds"]:.0f} s from data loaded to the last evaluation, {timing["images_per_second"]:,.0f}
training images/s); {versions}.
"""


def build_model_card(
    run_dir: str | Path,
    repo_id: str | None = None,
    dataset_id: str | None = None,
    license: str = "apache-2.0",
    plots_folder: str = PLOTS_FOLDER,
) -> ModelCard:
    """The card of a finished run.

    ``dataset_id``: the Hub dataset for the metadata (None: a local copy, named by its folder);
    ``plots_folder``: where the card's images are, relative to the card.
    """
    run_dir = Path(run_dir)
    run = read_finished_run(run_dir)
    settings, results = run.settings, run.results
    require_fields(results, run_dir / RESULTS_FILE, CARD_RESULTS)
    best = run_dir / BEST_MODEL_FOLDER
    library = saved_library(best)
    config = read_model_config(best) if library == CIFAR_ACCEL else folder_summary(best)
    final = results["final_metrics"]
    dataset_name = dataset_id or Path(settings["dataset"]).name
    model_name = repo_id.split("/")[-1] if repo_id else f"{config['architecture']}-{dataset_name}"
    base = settings.get("base_model")  # with --init_from
    on_hub = base is not None and base["revision"] is not None
    hub_model = settings.get("hub_model")  # a timm or transformers model, fine-tuned from its Hub repo
    fine_tuned_from = hub_model["source"] if hub_model and hub_model["on_hub"] and hub_model["pretrained"] else None
    # Say what the number is: of part of the split only, and/or of the split that chose the epoch. A run records
    # subset_seed since --max_eval_samples draws at random; before, it took the first n images.
    partial = settings.get("max_eval_samples") is not None
    drawn = partial and settings.get("subset_seed") is not None
    split = f"{final['split']}[:{final['n']}]" if partial and not drawn else final["split"]
    chosen_on_it = results["selected_by"] == final["split"]
    metric_name = (
        "Top-1 accuracy"
        + (f" on {final['n']:,} images drawn at random" if drawn else "")
        + (" (best epoch chosen on this split)" if chosen_on_it else "")
    )
    # The card's name and the commit trained on, when the run loaded this very Hub dataset (not a local copy).
    trained_on_it = dataset_id == settings["dataset"]
    evaluation = EvalResult(
        task_type="image-classification",
        dataset_type=dataset_id,
        dataset_name=(trained_on_it and settings.get("dataset_pretty_name")) or dataset_id,
        dataset_config=settings.get("dataset_config"),
        dataset_revision=settings.get("dataset_revision") if trained_on_it else None,
        dataset_split=split,
        metric_type="accuracy",
        metric_name=metric_name,
        metric_value=final["top1"],
    )
    library_name, tags = _library_metadata(library)
    card_data = ModelCardData(
        # The Hub links a fine-tune to the repo it started from.
        base_model=fine_tuned_from or (base["source"] if on_hub else None),
        base_model_relation="finetune" if fine_tuned_from else None,
        library_name=library_name,
        pipeline_tag="image-classification",
        license=license,
        tags=[*tags, config["architecture"]],
        datasets=[dataset_id] if dataset_id else None,
        metrics=["accuracy"],
        model_name=model_name if dataset_id else None,  # only the model-index uses it
        # The model-index names a Hub dataset; a local copy has none to name, so it gets no model-index.
        eval_results=[evaluation] if dataset_id else None,
    )
    figures = [
        f"## {title}\n\n![{title}]({plots_folder}/{name})\n\n"
        for title, name in (("Training curves", CURVES_PLOT), ("Confusion matrix", CONFUSION_PLOT))
        if (run_dir / PLOTS_FOLDER / name).is_file()
    ]
    started_from = ""
    if base:
        where = f"the weights in `{base['source']}`"
        if on_hub:
            where = f"`{base['source']}` at revision `{base['revision']}`"
        started_from = f" It started from {where}, a {base['num_classes']}-class model."
    if hub_model:
        where = f"`{hub_model['source']}`" + (
            f" at revision `{hub_model['revision']}`" if hub_model["revision"] else ""
        )
        weights = "the published weights of" if hub_model["on_hub"] else "the weights in"
        if not hub_model["pretrained"]:
            weights = "random weights, in the architecture of"
        started_from = f" It started from {weights} {where} ({library})."
    images = f"{final['n']:,} images"
    if partial:
        images = f"{images} drawn at random (seed {settings['subset_seed']})" if drawn else f"the first {images}"
    chose = " (the split that chose the best epoch)" if chosen_on_it else ""
    body = (
        f"# {model_name}\n\n`{config['architecture']}` trained on `{dataset_name}` with cifar_accel: "
        f"{config['num_classes']} classes, {_percent(final['top1'])} top-1 on {images} of its "
        f"`{final['split']}` split{chose}.{started_from}\n\n"
        f"{_results_section(results, dataset_name)}\n{''.join(figures)}{_training_section(settings, results)}\n"
        + _usage(repo_id or str((run_dir / BEST_MODEL_FOLDER).resolve()), library)
    )
    return _card(card_data, body)

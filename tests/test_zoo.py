"""The Hub's model zoo: timm and transformers models fine-tuned here and handed back in their own format.

No weights can be downloaded here, so the models are tiny and random, saved locally by each library's own
saver (timm's ``save_for_hf``, transformers' ``save_pretrained``), and published through the stand-in Hub.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, run_command
from datasets import load_dataset
from safetensors.torch import load_file

from cifar_accel import load_model
from cifar_accel.cli import main
from cifar_accel.engine import train
from cifar_accel.optim import build_optimizers
from cifar_accel.settings import parse_train_args
from cifar_accel.zoo import build_zoo_model, zoo_source

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

FIVE_CLASSES = ["a", "b", "c", "d", "e"]  # the tiny models' own classes; the colour dataset has four
SIDE = 48  # the tiny models' input size: the colour dataset's 32x32 images are resized to it
FEW_STEPS = ("--max_train_samples", "128", "--batch_size", "32", "--epochs", "2", "--optimizer", "adamw",
             "--learning_rate", "0.002", "--weight_decay", "0.05", "--num_workers", "0")  # fmt: skip
MODELS = ("timm vit", "timm resnet", "transformers vit")


@pytest.fixture(scope="session")
def zoo_models(tmp_path_factory) -> dict[str, Path]:
    """Three tiny random 5-class models of input size 48, each saved in its library's own format."""
    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    labels = {"label_names": FIVE_CLASSES}
    for name, folder, options in (("test_vit", "timm_vit", {"img_size": SIDE}), ("test_resnet", "timm_resnet", {})):
        timm.models.save_for_hf(timm.create_model(name, num_classes=5, **options), root / folder, model_config=labels,
                                safe_serialization=True, data_config={"input_size": (3, SIDE, SIDE)})  # fmt: skip
    config = transformers.ViTConfig(
        image_size=SIDE, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, id2label=dict(enumerate(FIVE_CLASSES)),
        label2id={name: index for index, name in enumerate(FIVE_CLASSES)},
    )  # fmt: skip
    transformers.ViTForImageClassification(config).save_pretrained(root / "hf_vit")
    transformers.ViTImageProcessor(size={"height": SIDE, "width": SIDE}).save_pretrained(root / "hf_vit")
    return {"timm vit": root / "timm_vit", "timm resnet": root / "timm_resnet", "transformers vit": root / "hf_vit"}


def model_flags(zoo_models: dict[str, Path], name: str) -> list[str]:
    folder = str(zoo_models[name])
    return ["--model_name_or_path", folder] if name.startswith("transformers") else ["--model", f"local-dir:{folder}"]


def train_run(dataset: Path, output_dir: Path, *flags: str) -> dict:
    return train(parse_train_args(["--dataset", str(dataset), "--output_dir", str(output_dir), *flags]))


@pytest.fixture(scope="module")
def fine_tuned(zoo_models, colour_dataset, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Each tiny model fine-tuned for two epochs on the four colours: its run folder and what it printed."""
    runs = {}
    for name in MODELS:
        run_dir = tmp_path_factory.mktemp("fine_tuned") / "run"
        result = run_command([sys.executable, "train.py", "--dataset", str(colour_dataset), "--output_dir",
                              str(run_dir), *model_flags(zoo_models, name), *FEW_STEPS])  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = run_dir, result.stdout
    return runs


def random_images(count: int = 6) -> torch.Tensor:
    return torch.randn(count, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))


def own_library_logits(best: Path, images: torch.Tensor, library: str) -> torch.Tensor:
    with torch.no_grad():
        if library == "timm":
            return timm.create_model(f"local-dir:{best}", pretrained=True).eval()(images)
        return transformers.AutoModelForImageClassification.from_pretrained(best).eval()(images).logits


@pytest.mark.parametrize("name", MODELS)
def test_a_fine_tuned_model_is_saved_in_its_own_library_format_with_the_preprocessing_it_used(fine_tuned, name):
    run_dir, printed = fine_tuned[name]
    best, settings = run_dir / "best", json.loads((run_dir / "train_config.json").read_text())
    config = json.loads((best / "config.json").read_text())
    classes = ["red", "green", "blue", "yellow"]
    if name.startswith("timm"):
        head = "head" if name == "timm vit" else "fc"
        assert f"note: the classifier ({head}) starts afresh: 5 classes in local-dir:" in printed
        assert config["label_names"] == classes and config["num_classes"] == 4
        preprocessing = config["pretrained_cfg"]
        assert preprocessing["input_size"] == [3, SIDE, SIDE] and preprocessing["crop_pct"] == 1.0
        assert preprocessing["interpolation"] == ("bicubic" if name == "timm vit" else "bilinear")
        mean, std = preprocessing["mean"], preprocessing["std"]
    else:
        assert "note: classifier starts afresh: not in" in printed
        assert config["id2label"] == {str(index): label for index, label in enumerate(classes)}
        processor = json.loads((best / "preprocessor_config.json").read_text())
        assert processor["size"] == {"height": SIDE, "width": SIDE} and processor["resample"] == 2
        mean, std = processor["image_mean"], processor["image_std"]
    # The run normalised with the model's own statistics, not the dataset's, and recorded where it came from.
    assert (settings["mean"], settings["std"]) == (mean, std)
    assert settings["hub_model"]["library"] == name.split()[0] and settings["hub_model"]["on_hub"] is False
    assert sorted(path.name for path in best.iterdir()) == sorted(
        ["README.md", "config.json", "model.safetensors"]
        + (["preprocessor_config.json"] if name.startswith("transformers") else [])
    )


@pytest.mark.parametrize("name", MODELS)
def test_the_library_loads_the_saved_model_with_the_logits_and_answers_of_cifar_accel(fine_tuned, colour_dataset, name):
    run_dir, _ = fine_tuned[name]
    best, library = run_dir / "best", name.split()[0]
    model = load_model(run_dir)
    images = random_images()
    with torch.no_grad():
        assert torch.equal(own_library_logits(best, images, library), model(images))
    # The library's own preprocessing of a 32x32 image (timm's create_transform, the pipeline's image processor)
    # gives the classes that `predict` gives.
    test_images = [row["img"] for row in load_dataset(str(colour_dataset), split="test")][:40]
    ours = [prediction[0]["label"] for prediction in model.predict(test_images, top_k=1)]
    if library == "timm":
        network = timm.create_model(f"local-dir:{best}", pretrained=True).eval()
        transform = timm.data.create_transform(**timm.data.resolve_model_data_config(network))
        with torch.no_grad():
            logits = network(torch.stack([transform(image) for image in test_images]))
        theirs = [network.pretrained_cfg["label_names"][index] for index in logits.argmax(dim=1).tolist()]
    else:
        classify = transformers.pipeline("image-classification", model=str(best))
        theirs = [answer[0]["label"] for answer in classify(test_images, top_k=1)]
    assert sum(mine != other for mine, other in zip(ours, theirs, strict=True)) <= 1  # rounding to 8 bits aside


@pytest.mark.parametrize("name", ["timm resnet", "transformers vit"])
def test_evaluate_resizes_as_training_did_and_gives_the_final_accuracy(fine_tuned, colour_dataset, name, capsys):
    run_dir, _ = fine_tuned[name]
    main(["evaluate", "--model", str(run_dir), "--dataset", str(colour_dataset), "--num_workers", "0"])
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    final = json.loads((run_dir / "results.json").read_text())["final_metrics"]
    assert (metrics["top1"], metrics["n"]) == (final["top1"], final["n"])


def test_layer_decay_and_the_head_scale_set_each_layer_learning_rate(zoo_models):
    flags = ["--layer_decay", "0.5", "--head_lr_scale", "10", "--optimizer", "adamw", "--learning_rate", "0.01",
             "--weight_decay", "0.05"]  # fmt: skip
    config = parse_train_args([*model_flags(zoo_models, "timm vit"), *flags])
    model, _ = build_zoo_model(zoo_source(config), ["red", "green", "blue", "yellow"])
    [optimizer] = build_optimizers(model, config)
    group_of = {id(parameter): group for group in optimizer.param_groups for parameter in group["params"]}
    network = model.network
    depth = len(network.blocks) + 1  # timm's layer map: embeddings 0, block i at i + 1, the head after the last
    assert group_of[id(network.head.weight)]["lr"] == pytest.approx(0.01 * 10)
    assert group_of[id(network.blocks[-1].mlp.fc1.weight)]["lr"] == pytest.approx(0.01 * 0.5)
    assert group_of[id(network.patch_embed.proj.weight)]["lr"] == pytest.approx(0.01 * 0.5**depth)
    # No weight decay for biases, norms, the position embedding and the class token, as timm fine-tunes.
    for parameter in (network.head.bias, network.norm.weight, network.pos_embed, network.cls_token):
        assert group_of[id(parameter)]["weight_decay"] == 0
    assert group_of[id(network.blocks[0].attn.qkv.weight)]["weight_decay"] == 0.05


def test_a_frozen_backbone_keeps_every_weight_but_the_classifier(zoo_models, colour_dataset, tmp_path):
    train_run(colour_dataset, tmp_path / "run", *model_flags(zoo_models, "transformers vit"), "--freeze_backbone",
              *FEW_STEPS)  # fmt: skip
    before = load_file(zoo_models["transformers vit"] / "model.safetensors")
    after = load_file(tmp_path / "run" / "best" / "model.safetensors")
    changed = sorted(name for name in after if not torch.equal(before[name], after[name]))
    assert changed == ["classifier.bias", "classifier.weight"]


def test_training_tricks_work_on_a_hub_model_and_its_run_replays_to_the_same_metrics(
    zoo_models, colour_dataset, tmp_path
):
    """bf16, channels_last, gradient accumulation, EMA, MixUp, the device loader and TTA on a timm convnet."""
    tricks = ["--mixed_precision", "bf16", "--channels_last", "--gradient_accumulation_steps", "2", "--model_ema",
              "0.9", "--mixup", "0.4", "--data_loader", "device", "--tta_level", "2"]  # fmt: skip
    first = train_run(colour_dataset, tmp_path / "first", *model_flags(zoo_models, "timm resnet"), *FEW_STEPS, *tricks)
    assert first["final_metrics"]["n"] == 101 and "tta_metrics" in first
    replayed = train(parse_train_args(["--config", str(tmp_path / "first" / "train_config.json"), "--output_dir",
                                       str(tmp_path / "replayed")]))  # fmt: skip
    assert replayed["final_metrics"] == first["final_metrics"]


def test_a_saved_hub_model_is_fine_tuned_again_with_init_from(fine_tuned, colour_dataset, tmp_path):
    for name, flag in (("timm vit", "--model"), ("transformers vit", "--model_name_or_path")):
        best = fine_tuned[name][0] / "best"
        config = parse_train_args(["--init_from", str(best.parent)])
        spelled = config.model if flag == "--model" else config.model_name_or_path
        assert spelled == (f"local-dir:{best}" if flag == "--model" else str(best)) and config.init_from is None
    results = train_run(colour_dataset, tmp_path / "again", "--init_from", str(fine_tuned["timm vit"][0]), *FEW_STEPS)
    assert results["final_metrics"]["n"] == 101


@pytest.mark.parametrize("name", ["timm vit", "transformers vit"])
def test_a_hub_model_run_killed_mid_epoch_resumes_bit_for_bit(zoo_models, colour_dataset, tmp_path, name):
    flags = [*model_flags(zoo_models, name), *FEW_STEPS, "--checkpointing_steps", "3", "--model_ema", "0.9"]

    def command(run_dir: Path) -> list[str]:
        return [sys.executable, "tests/slow_train.py", "--dataset", str(colour_dataset), "--output_dir", str(run_dir),
                *flags]  # fmt: skip

    reference = run_command(command(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    run_dir = tmp_path / "killed"
    log = (tmp_path / "killed.log").open("w")
    env = {**os.environ, "CIFAR_ACCEL_TEST_STEP_SECONDS": "0.3", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command(run_dir), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "step_3" / "progress.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.05)
    process.kill()  # SIGKILL a step or two after the first checkpoint: nothing more is saved
    process.wait()
    assert not (run_dir / "results.json").exists()
    resumed = run_command([*command(run_dir), "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for weights in ("best/model.safetensors", "checkpoints/step_6/model.safetensors"):
        expected, actual = load_file(tmp_path / "reference" / weights), load_file(run_dir / weights)
        assert expected.keys() == actual.keys() and all(torch.equal(expected[key], actual[key]) for key in expected)
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 2

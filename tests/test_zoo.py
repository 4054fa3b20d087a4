"""The Hub's model zoo: timm and transformers models fine-tuned here and handed back in their own format.

No weights can be downloaded here, so the models are tiny and random, saved locally by each library's own
saver (timm's ``save_for_hf``, transformers' ``save_pretrained``), and published through the stand-in Hub.
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import ALICE, REPO_ROOT, accelerate_launch, hub_env, run_command
from datasets import load_dataset
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import load_file

from cifar_accel import load_model
from cifar_accel.cli import main
from cifar_accel.engine import train
from cifar_accel.errors import UserError
from cifar_accel.hub import push_run
from cifar_accel.model_card import build_model_card
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
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            train_run(colour_dataset, run_dir, *model_flags(zoo_models, name), *FEW_STEPS)
        runs[name] = run_dir, printed.getvalue()
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

    train_run(colour_dataset, tmp_path / "reference", *flags)  # uninterrupted, in this process
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


def test_pushed_models_load_from_the_hub_in_their_own_libraries_with_the_same_logits(fine_tuned, hub, tmp_path):
    repos = {"timm vit": "alice/tiny-timm", "transformers vit": "alice/tiny-hf"}
    for name, repo in repos.items():
        push_run(fine_tuned[name][0], repo, token=ALICE)
        [commit] = hub.commits(repo)
        extra = {"preprocessor_config.json"} if name.startswith("transformers") else set()
        assert {"README.md", "config.json", "model.safetensors", *extra} <= set(commit["files_added"])
        card = ModelCard(commit["files_added"]["README.md"].decode())
        assert card.data.library_name == name.split()[0]
        usage = f'"hf-hub:{repo}", pretrained=True' if name.startswith("timm") else f'model="{repo}"'
        assert usage in card.text
    torch.save(random_images(), tmp_path / "images.pt")
    # Through the real client, into an empty Hugging Face cache: each library's own loader, then cifar_accel's.
    script = f"""import json, timm, torch, transformers, cifar_accel
images = torch.load({str(tmp_path / "images.pt")!r})
with torch.no_grad():
    logits = {{
        "timm": timm.create_model("hf-hub:alice/tiny-timm", pretrained=True).eval()(images),
        "transformers": transformers.AutoModelForImageClassification.from_pretrained("alice/tiny-hf")(images).logits,
        "cifar_accel timm": cifar_accel.load_model("alice/tiny-timm")(images),
        "cifar_accel transformers": cifar_accel.load_model("alice/tiny-hf")(images),
    }}
labels = transformers.pipeline("image-classification", model="alice/tiny-hf").model.config.id2label
print(json.dumps({{**{{name: value.tolist() for name, value in logits.items()}}, "labels": labels}}))"""
    result = run_command([sys.executable, "-c", script], env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    downloaded = json.loads(result.stdout.strip().splitlines()[-1])
    for name in repos:
        library = name.split()[0]
        local = load_model(fine_tuned[name][0])(random_images()).tolist()
        assert downloaded[library] == downloaded[f"cifar_accel {library}"] == local
    assert list(downloaded["labels"].values()) == ["red", "green", "blue", "yellow"]


@pytest.mark.parametrize("name", ["timm resnet", "transformers vit"])
def test_a_hub_repo_is_fine_tuned_at_a_revision_and_the_card_names_it_as_base(
    zoo_models, colour_dataset, hub, tmp_path, monkeypatch, name
):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    repo = f"alice/{zoo_models[name].name}"
    api = HfApi(endpoint=hub.endpoint, token=ALICE)
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=zoo_models[name])
    flags = ["--model_name_or_path", repo] if name.startswith("transformers") else ["--model", f"hf-hub:{repo}"]
    # A revision the repo does not have: one line, before the data is loaded, nothing written.
    with pytest.raises(UserError, match=f"{repo} has no revision 'nope'"):
        train_run(colour_dataset, tmp_path / "refused", *flags, *FEW_STEPS, "--model_revision", "nope")
    assert not (tmp_path / "refused").exists()
    train_run(colour_dataset, tmp_path / "run", *flags, *FEW_STEPS, "--model_revision", "main")
    card = build_model_card(tmp_path / "run", "alice/tuned", "uoft-cs/cifar10")
    assert (card.data.base_model, card.data.base_model_relation) == (repo, "finetune")
    assert f"It started from the published weights of `{repo}` at revision `main`" in card.text


def test_timm_spellings_name_the_same_hub_repo():
    for model in ("timm/resnet18.a1_in1k", "hf-hub:timm/resnet18.a1_in1k"):
        source = zoo_source(parse_train_args(["--model", model]))
        assert (source.library, source.location, source.on_hub, source.revision) == (
            "timm",
            "timm/resnet18.a1_in1k",
            True,
            None,
        )
    source = zoo_source(parse_train_args(["--model", "hf-hub:timm/resnet18.a1_in1k@v1"]))
    assert source.revision == "v1"


@pytest.fixture(scope="module")
def mismatched(zoo_models, tmp_path_factory) -> dict[str, Path]:
    """Copies of the tiny models whose config.json describes a wider network than their weights."""
    root = tmp_path_factory.mktemp("mismatched")
    folders = {}
    for name, key, setting in (("timm vit", "model_args", "depth"), ("transformers vit", None, "num_hidden_layers")):
        folder = shutil.copytree(zoo_models[name], root / zoo_models[name].name)
        config = json.loads((folder / "config.json").read_text())
        (config[key] if key else config)[setting] = 3  # blocks the weights do not hold, or fewer
        (folder / "config.json").write_text(json.dumps(config))
        folders[name] = folder
    return folders


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--model", "local-dir:{transformers vit}"],
            "holds a transformers model, not a timm one; use --model_name_or",
        ),
        (["--model_name_or_path", "{timm vit}"], "holds a timm model, not a transformers one; use --model local-dir:"),
        (["--model", "local-dir:/no/such/model"], "--model local-dir:/no/such/model: no such folder"),
        (["--model_name_or_path", "./no/such/model"], "--model_name_or_path ./no/such/model: no such folder"),
        (["--model", "local-dir:{mismatched timm vit}"], "its weights do not match its config.json"),
        (["--model_name_or_path", "{mismatched transformers vit}"], "its weights do not match its config.json"),
        (["--model", "local-dir:{timm vit}", "--model_revision", "v1"], "--model_revision is for Hub repos; .* local"),
        (["--model", "local-dir:{timm vit}", "--layer_decay", "1.5"], r"--layer_decay must be in \(0, 1\]"),
        (["--model", "resnet9", "--model_revision", "v1"], "--model_revision is for Hub models"),
        (["--model", "resnet9", "--no-pretrained"], "--pretrained is for Hub models"),
        (["--model", "resnet9", "--head_lr_scale", "10"], "--head_lr_scale is for Hub models"),
        (["--model", "airbench94", "--model_name_or_path", "{transformers vit}"], "name two models: give one"),
        (["--model", "resnet9", "--freeze_backbone"], "--freeze_backbone needs weights to keep"),
    ],
)
def test_what_cannot_build_a_hub_model_is_refused_in_one_line_before_anything_is_written(
    zoo_models, mismatched, colour_dataset, tmp_path, flags, message
):
    folders = {**{name: str(path) for name, path in zoo_models.items()},
               **{f"mismatched {name}": str(path) for name, path in mismatched.items()}}  # fmt: skip
    with pytest.raises(UserError, match=message):
        train_run(colour_dataset, tmp_path / "run", *[flag.format(**folders) for flag in flags], *FEW_STEPS)
    assert not (tmp_path / "run").exists()


def test_a_missing_library_is_one_line_naming_its_install_command(zoo_models, colour_dataset, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what an environment without timm gives on import
    with pytest.raises(UserError, match=r'timm is not installed: pip install "cifar-accel\[timm\]"'):
        train_run(colour_dataset, tmp_path / "run", *model_flags(zoo_models, "timm vit"), *FEW_STEPS)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_processes_and_a_compiled_model_fine_tune_a_hub_model(zoo_models, colour_dataset, tmp_path):
    flags = ["--dataset", str(colour_dataset), *model_flags(zoo_models, "timm resnet"), *FEW_STEPS]
    launch = "--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no"
    result = run_command(accelerate_launch(*launch.split(), "--main_process_port", "29631", "train.py", *flags,
                                           "--output_dir", str(tmp_path / "two")))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "results.json").read_text())["final_metrics"]["n"] == 101
    compiled = train_run(colour_dataset, tmp_path / "compiled", *flags[2:], "--compile")
    assert compiled["final_metrics"]["n"] == 101
    assert (tmp_path / "compiled" / "best" / "config.json").is_file()


def test_a_hub_model_gets_fine_tuning_defaults_and_its_input_size_from_image_size(zoo_models):
    config = parse_train_args([*model_flags(zoo_models, "timm vit"), "--image_size", "64", "--learning_rate", "1e-4"])
    # The transformers example's settings, where no flag or recipe gives one; what is given wins.
    assert (config.optimizer, config.learning_rate, config.weight_decay, config.label_smoothing) == (
        "adamw",
        1e-4,
        0.0,
        0.0,
    )
    for name in ("timm vit", "timm resnet"):
        source = zoo_source(parse_train_args([*model_flags(zoo_models, name), "--image_size", "64"]))
        model, _ = build_zoo_model(source, ["red", "green", "blue", "yellow"], image_size=64)
        assert model.spec.side == 64 and model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    # A transformers ViT's saved model could not be used at another size by its own library: refused.
    source = zoo_source(parse_train_args(model_flags(zoo_models, "transformers vit")))
    with pytest.raises(UserError, match="--image_size 64: ViTForImageClassification takes 48x48 images"):
        build_zoo_model(source, ["red", "green", "blue", "yellow"], image_size=64)

"""Publishing and downloading: the saved format, predict, the model card, and push/download through
huggingface_hub's real HTTP client against a stand-in Hub on 127.0.0.1 (``tests/hub_server.py``)."""

import json
import shutil
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from conftest import ALICE, BOB, cifar_accel_command, hub_env, run_command
from datasets import load_dataset
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file, save_file

from cifar_accel import ImageClassifier, get_model, load_model
from cifar_accel.cli import main
from cifar_accel.errors import UserError
from cifar_accel.hub import push_run
from cifar_accel.model_card import build_model_card

PUBLISHED = {"README.md", "model.safetensors", "config.json", "train_config.json", "metrics.jsonl", "summary.csv",
             "results.json", "plots/curves.png", "plots/confusion_matrix.png"}  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(colour_dataset, tmp_path_factory) -> Path:
    """One short epoch: about half the test images right, so accuracies can disagree if anything differs."""
    run_dir = tmp_path_factory.mktemp("run")
    flags = "--model simple_cnn --epochs 1 --batch_size 64 --optimizer adamw --learning_rate 0.005 --num_workers 0"
    command = ["train", "--dataset", str(colour_dataset), "--output_dir", str(run_dir / "run"), *flags.split()]
    result = run_command(cifar_accel_command(*command))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "run"


def _snapshot(folder: Path) -> dict:
    return {str(path): (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.rglob("*")}


def _test_images(colour_dataset: Path) -> tuple[list[Image.Image], list[int]]:
    split = load_dataset(str(colour_dataset), split="test")
    return [row["img"] for row in split], [row["label"] for row in split]


def _logits_of(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0)))


def test_a_trained_model_round_trips_through_a_folder_with_the_same_logits(tmp_path):
    model = ImageClassifier("bn_cnn", 3, ["a", "b", "c"], [0.5] * 3, [0.25] * 3, model_args={"fc_dropout": 0.2})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):  # a few real steps, so BatchNorm statistics and weights differ from initialisation
        loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.randint(0, 3, (8,)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(tmp_path)

    assert sorted(path.name for path in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert {key: config[key] for key in ("architecture", "model_args", "num_classes", "class_names")} == {
        "architecture": "bn_cnn", "model_args": {"fc_dropout": 0.2}, "num_classes": 3, "class_names": ["a", "b", "c"]
    }  # fmt: skip
    assert config["mean"] == [0.5] * 3 and config["input_size"] == [3, 32, 32] and "cifar_accel_version" in config
    for loaded in (load_model(tmp_path), ImageClassifier.from_pretrained(tmp_path)):
        assert not loaded.training
        assert torch.equal(_logits_of(loaded), _logits_of(model))
    # The weights file is the network's own state dict: it loads into the registry model as it is.
    network = get_model("bn_cnn", num_classes=3, fc_dropout=0.2).eval()
    network.load_state_dict(load_file(tmp_path / "model.safetensors"))
    assert torch.equal(_logits_of(network), _logits_of(model))


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_loading_is_strict_about_the_weights(tmp_path, change):
    ImageClassifier("simple_cnn", 3, ["a", "b", "c"], [0.5] * 3, [0.25] * 3).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    if change == "extra":
        weights["head.extra"] = torch.zeros(1)
    else:
        weights.pop(sorted(weights)[0])
    save_file(weights, tmp_path / "model.safetensors")
    expected = "Unexpected key" if change == "extra" else "Missing key"
    with pytest.raises(UserError, match=f"do not match architecture 'simple_cnn': {expected}"):
        load_model(tmp_path)


def test_predict_takes_pil_images_arrays_and_tensors_alike(run_dir):
    model = load_model(run_dir / "best")
    pixels = np.full((32, 32, 3), (200, 40, 40), dtype=np.uint8)
    from_pil = model.predict(Image.fromarray(pixels), top_k=2)
    assert [set(entry) for entry in from_pil] == [{"label", "score"}] * 2
    assert from_pil[0]["score"] >= from_pil[1]["score"]
    assert model.predict(pixels, top_k=2) == from_pil
    assert model.predict(torch.from_numpy(pixels).permute(2, 0, 1), top_k=2) == from_pil
    assert model.predict(np.stack([pixels, pixels]), top_k=2) == [from_pil, from_pil]
    everything = model.predict(Image.fromarray(pixels), top_k=10)  # more than there are classes: all four
    assert sorted(entry["label"] for entry in everything) == ["blue", "green", "red", "yellow"]
    assert sum(entry["score"] for entry in everything) == pytest.approx(1.0, abs=1e-5)
    assert len(model.predict(Image.fromarray(np.repeat(pixels, 3, axis=0)))) == 4  # 96x32: resized first


def test_predict_accuracy_equals_the_evaluate_command(run_dir, colour_dataset):
    result = run_command(cifar_accel_command("evaluate", "--model", str(run_dir / "best"), "--dataset",
                                             str(colour_dataset), "--num_workers", "0"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    images, labels = _test_images(colour_dataset)
    names = load_model(run_dir / "best").config["class_names"]
    predictions = load_model(run_dir / "best").predict(images, top_k=4, batch_size=32)
    top1 = np.mean([ranked[0]["label"] == names[label] for ranked, label in zip(predictions, labels, strict=True)])
    assert 0.3 < evaluated["top1"] < 0.9  # neither chance nor perfect: agreement below means something
    assert top1 == evaluated["top1"]
    scores = [{entry["label"]: entry["score"] for entry in ranked} for ranked in predictions]
    loss = np.mean([-np.log(score[names[label]]) for score, label in zip(scores, labels, strict=True)])
    assert loss == pytest.approx(evaluated["loss"], rel=1e-5)
    assert evaluated["top1"] == json.loads((run_dir / "results.json").read_text())["final_metrics"]["top1"]


def test_push_commits_the_run_once_and_the_model_downloads_with_the_same_logits(run_dir, hub, tmp_path):
    before = _snapshot(run_dir)
    result = run_command(
        cifar_accel_command("push", "--run_dir", str(run_dir), "--repo_id", "alice/colours", "--dataset_id",
                            "uoft-cs/cifar10"),
        env=hub_env(hub, tmp_path, HF_TOKEN=ALICE),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{hub.endpoint}/alice/colours" in result.stdout
    assert _snapshot(run_dir) == before  # pushing writes nothing locally

    [commit] = hub.commits("alice/colours")
    assert set(commit["files_added"]) == PUBLISHED
    local = {"model.safetensors": "best/model.safetensors", "config.json": "best/config.json"}
    for path_in_repo, data in commit["files_added"].items():
        if path_in_repo != "README.md":
            assert data == (run_dir / local.get(path_in_repo, path_in_repo)).read_bytes(), path_in_repo

    card = ModelCard(commit["files_added"]["README.md"].decode())
    results = json.loads((run_dir / "results.json").read_text())
    assert card.data.library_name == "cifar-accel" and card.data.pipeline_tag == "image-classification"
    assert card.data.datasets == ["uoft-cs/cifar10"] and card.data.license == "apache-2.0"
    assert {"model_hub_mixin", "pytorch_model_hub_mixin", "cifar-accel", "simple_cnn"} <= set(card.data.tags)
    [evaluation] = card.data.eval_results
    assert evaluation.metric_type == "accuracy" and evaluation.dataset_split == "test"
    # No hold-out: the test split chose the epoch, and the metadata says so rather than overstate.
    assert evaluation.metric_name == "Top-1 accuracy (best epoch chosen on this split)"
    assert evaluation.dataset_type == evaluation.dataset_name == "uoft-cs/cifar10"
    assert "`test` split (the split that chose the best epoch)." in card.text
    assert evaluation.metric_value == results["final_metrics"]["top1"]
    for expected in ("![Training curves](plots/curves.png)", '"alice/colours"', "| yellow |", "top-5 accuracy"):
        assert expected in card.text

    # Download through the real client into the Hugging Face cache, then again offline from the cache.
    script = "import torch, cifar_accel; print(cifar_accel.load_model('alice/colours')(torch.load('x.pt')).tolist())"
    torch.save(torch.randn(4, 3, 32, 32), tmp_path / "x.pt")
    expected_logits = load_model(run_dir / "best")(torch.load(tmp_path / "x.pt")).tolist()
    for offline in ("0", "1"):
        if offline == "1":
            hub.stop()
        result = run_command([sys.executable, "-c", script.replace("x.pt", str(tmp_path / "x.pt"))],
                             env=hub_env(hub, tmp_path, HF_HUB_OFFLINE=offline))  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(result.stdout.strip().splitlines()[-1]) == expected_logits
    assert ALICE not in result.stdout + result.stderr


def test_push_to_a_branch_of_a_private_repo(run_dir, hub, tmp_path):
    url = push_run(run_dir, "alice/private", private=True, revision="v1", commit_message="first", token=ALICE)
    assert url == f"{hub.endpoint}/alice/private/tree/v1"
    assert hub.repo("alice/private")["private"] is True
    assert hub.commits("alice/private", "main") == []
    [commit] = hub.commits("alice/private", "v1")
    assert commit["message"] == "first" and set(commit["files_added"]) == PUBLISHED
    card = ModelCard(commit["files_added"]["README.md"].decode())
    assert card.data.datasets is None  # trained on a local folder: no Hub dataset is claimed
    with pytest.raises(UserError, match="alice/private not found .* or it is private"):
        load_model("alice/private", revision="v1", token=False, cache_dir=tmp_path)
    owner_copy = load_model("alice/private", revision="v1", token=ALICE, cache_dir=tmp_path)
    assert torch.equal(_logits_of(owner_copy), _logits_of(load_model(run_dir / "best")))


def test_a_gated_repo_says_to_accept_its_terms(run_dir, hub, tmp_path):
    push_run(run_dir, "alice/gated", token=ALICE)
    hub.gate("alice/gated")
    for token in (BOB, False):
        with pytest.raises(UserError, match="alice/gated is gated: accept its terms on the Hub") as refused:
            load_model("alice/gated", token=token, cache_dir=tmp_path)
        assert "not found" not in str(refused.value)
    assert load_model("alice/gated", token=ALICE, cache_dir=tmp_path) is not None  # its owner reads it


def test_the_mixin_methods_push_and_load_the_same_format(hub, tmp_path):
    model = ImageClassifier("simple_cnn", 3, ["a", "b", "c"], [0.5] * 3, [0.25] * 3).eval()
    model.push_to_hub("alice/mixin", token=ALICE)
    [commit] = hub.commits("alice/mixin")
    assert set(commit["files_added"]) == {"README.md", "config.json", "model.safetensors"}
    card = ModelCard(commit["files_added"]["README.md"].decode())
    assert card.data.library_name == "cifar-accel" and "pytorch_model_hub_mixin" in card.data.tags
    loaded = ImageClassifier.from_pretrained("alice/mixin", cache_dir=tmp_path)
    assert torch.equal(_logits_of(loaded), _logits_of(model))


@pytest.mark.parametrize(
    ("repo_id", "token", "message"),
    [
        ("alice/x", None, "no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login`"),
        ("not a repo", ALICE, "--repo_id must be USER/NAME or ORG/NAME"),
        ("alice/x", BOB, "cannot push to alice/x: permission denied for alice/x \\(HTTP 403\\)"),
        ("alice/x", "hf_unknown_0123456789secret", "cannot push to alice/x: the Hub refused the token \\(HTTP 401\\)"),
    ],
)
def test_push_errors_are_one_line_and_change_nothing(run_dir, hub, repo_id, token, message):
    before = _snapshot(run_dir)
    with pytest.raises(UserError, match=message) as raised:
        push_run(run_dir, repo_id, token=token)
    assert "\n" not in str(raised.value) and "secret" not in str(raised.value)
    assert _snapshot(run_dir) == before
    assert not any("/commit/" in path for _, path, _ in hub.requests)


def test_push_reads_the_token_stored_by_hf_auth_login(run_dir, hub):
    Path(huggingface_hub.constants.HF_TOKEN_PATH).write_text(ALICE)
    push_run(run_dir, "alice/stored")
    assert len(hub.commits("alice/stored")) == 1


def test_push_reports_an_unreachable_hub_in_one_line(run_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    before = _snapshot(run_dir)
    with pytest.raises(UserError, match="cannot push to alice/x: cannot reach http://127.0.0.1:9"):
        push_run(run_dir, "alice/x", token=ALICE)
    assert _snapshot(run_dir) == before


def test_push_refuses_an_unfinished_run(run_dir, tmp_path):
    (tmp_path / "best").mkdir()
    for name in ("train_config.json", "metrics.jsonl", "best/model.safetensors", "best/config.json"):
        (tmp_path / name).write_bytes((run_dir / name).read_bytes())
    with pytest.raises(UserError, match="is not a finished run \\(missing .*results.json\\)"):
        push_run(tmp_path, "alice/x", token=ALICE)


def test_train_pushes_the_best_model_at_the_end(colour_dataset, hub, tmp_path):
    output = tmp_path / "run"
    flags = f"--dataset {colour_dataset} --output_dir {output} --model simple_cnn --epochs 1 --num_workers 0"
    command = cifar_accel_command("train", *flags.split(), "--push_to_hub", "--hub_model_id", "alice/trained")
    result = run_command(command, env=hub_env(hub, tmp_path, HF_TOKEN=ALICE))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"pushed the best model to {hub.endpoint}/alice/trained" in result.stdout
    [commit] = hub.commits("alice/trained")
    assert commit["files_added"]["model.safetensors"] == (output / "best" / "model.safetensors").read_bytes()
    local_card = ModelCard.load(output / "best" / "README.md")  # the run's own card, images relative to best/
    assert "![Training curves](../plots/curves.png)" in local_card.text and '"alice/trained"' in local_card.text
    for text in (result.stdout, result.stderr, *(path.read_text() for path in output.rglob("*.json*"))):
        assert ALICE not in text


def test_train_refuses_to_start_a_run_it_could_not_push(colour_dataset, tmp_path):
    output = tmp_path / "run"
    flags = f"--dataset {colour_dataset} --output_dir {output} --push_to_hub --hub_model_id alice/x"
    environment = {"HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": ""}
    result = run_command(cifar_accel_command("train", *flags.split()), env=environment)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login`"
    )
    assert not output.exists()


def test_a_model_pushed_to_the_hub_is_fine_tuned_by_repo_id_and_the_card_names_it(
    run_dir, hub, colour_dataset, tmp_path
):
    push_run(run_dir, "alice/colours", token=ALICE)
    output = tmp_path / "tuned"
    flags = f"--init_from alice/colours --dataset {colour_dataset} --output_dir {output} --epochs 1 --num_workers 0"
    command = cifar_accel_command("train", *flags.split(), "--push_to_hub", "--hub_model_id", "alice/tuned")
    result = run_command(command, env=hub_env(hub, tmp_path, HF_TOKEN=ALICE))
    assert result.returncode == 0, result.stderr[-3000:]
    base_model = json.loads((output / "train_config.json").read_text())["base_model"]
    [pushed] = hub.commits("alice/colours")
    assert base_model == {"source": "alice/colours", "revision": pushed["oid"], "architecture": "simple_cnn",
                          "num_classes": 4}  # fmt: skip
    [commit] = hub.commits("alice/tuned")
    card = ModelCard(commit["files_added"]["README.md"].decode())
    assert card.data.base_model == "alice/colours" and f"`alice/colours` at revision `{pushed['oid']}`" in card.text
    # Once cached, the base model is found without the network.
    hub.stop()
    script = "from cifar_accel.settings import parse_train_args as p; print(p(['--init_from', 'alice/colours']).model)"
    result = run_command([sys.executable, "-c", script], env=hub_env(hub, tmp_path, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "simple_cnn", result.stderr[-3000:]


@pytest.mark.parametrize("subset_seed", [0, None], ids=["drawn at random", "first rows (recorded before seeds)"])
def test_a_card_of_part_of_a_split_says_so_in_its_metadata_and_headline(run_dir, tmp_path, subset_seed):
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial)
    settings = json.loads((partial / "train_config.json").read_text())
    settings.update(max_eval_samples=50, subset_seed=subset_seed)
    (partial / "train_config.json").write_text(json.dumps(settings))
    results = json.loads((partial / "results.json").read_text())
    results["final_metrics"]["n"] = 50
    (partial / "results.json").write_text(json.dumps(results))
    card = ModelCard(str(build_model_card(partial, "alice/colours", "uoft-cs/cifar10")))
    [evaluation] = card.data.eval_results
    assert evaluation.dataset_revision is None  # trained on a local copy: no Hub commit to name
    if subset_seed is None:
        assert evaluation.dataset_split == "test[:50]"
        images = "the first 50 images"
    else:
        assert evaluation.dataset_split == "test"
        assert evaluation.metric_name.startswith("Top-1 accuracy on 50 images drawn at random")
        images = "50 images drawn at random (seed 0)"
    assert f"top-1 on {images} of its `test` split (the split that chose the best epoch)." in card.text


def test_the_card_says_how_to_install_cifar_accel_from_the_repository_its_packaging_names(monkeypatch):
    from email.message import Message

    from cifar_accel import __version__, model_card

    declared = Message()
    declared["Project-URL"] = "Repository, https://example.org/cifar-accel"
    monkeypatch.setattr(model_card.importlib.metadata, "metadata", lambda name: declared)
    usage = model_card._usage("alice/colours")
    assert 'pip install "cifar-accel @ git+https://example.org/cifar-accel"' in usage and __version__ in usage
    monkeypatch.setattr(model_card.importlib.metadata, "metadata", lambda name: Message())  # none declared, as now
    assert f"Install cifar_accel {__version__}: `pip install -e .` in a checkout" in model_card._usage("alice/x")


def test_a_card_names_the_hub_commit_and_dataset_name_its_run_trained_on(run_dir, tmp_path):
    from_hub = tmp_path / "from_hub"
    shutil.copytree(run_dir, from_hub)
    settings = json.loads((from_hub / "train_config.json").read_text())
    commit = "0123456789abcdef0123456789abcdef01234567"
    recorded = {**settings, "dataset": "uoft-cs/cifar10", "dataset_revision": commit, "dataset_pretty_name": "CIFAR-10"}
    (from_hub / "train_config.json").write_text(json.dumps(recorded))  # as a run on the Hub id records them
    [evaluation] = ModelCard(str(build_model_card(from_hub, "alice/colours", "uoft-cs/cifar10"))).data.eval_results
    assert (evaluation.dataset_type, evaluation.dataset_name) == ("uoft-cs/cifar10", "CIFAR-10")
    assert evaluation.dataset_revision == commit
    [evaluation] = ModelCard(str(build_model_card(from_hub, "alice/colours", "other/cifar10"))).data.eval_results
    assert evaluation.dataset_revision is None  # another dataset named for the card: its commit is unknown
    assert evaluation.dataset_name == "other/cifar10"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncated", "cannot read the run in {run}: results.json is not valid JSON (Unterminated string"),
        ("top1 'high'", "{run}/results.json: final_metrics.top1 must be a fraction from 0 to 1, got 'high'"),
        ("model 5", "{run}/train_config.json: model must be a string, got 5"),
        ("eval_top1 'x'", "{run}/metrics.jsonl: line 1: eval_top1 must be a fraction from 0 to 1, got 'x'"),
        ("no epoch", "cannot read the run in {run}: metrics.jsonl holds no epoch"),
    ],
)
def test_push_refuses_a_run_whose_results_are_broken_in_the_line_compare_gives(
    run_dir, tmp_path, capsys, damage, message
):
    broken = shutil.copytree(run_dir, tmp_path / "broken")
    text = (broken / "results.json").read_text()
    if damage == "truncated":
        (broken / "results.json").write_text(text[: text.index('"top1"') + 3])
    elif damage == "top1 'high'":
        results = json.loads(text)
        results["final_metrics"]["top1"] = "high"
        (broken / "results.json").write_text(json.dumps(results))
    elif damage == "model 5":
        settings = json.loads((broken / "train_config.json").read_text())
        (broken / "train_config.json").write_text(json.dumps({**settings, "model": 5}))
    elif damage == "no epoch":
        (broken / "metrics.jsonl").write_text("")
    else:
        first, *rest = (broken / "metrics.jsonl").read_text().splitlines()
        (broken / "metrics.jsonl").write_text("\n".join([json.dumps({**json.loads(first), "eval_top1": "x"}), *rest]))
    before = _snapshot(broken)
    for command in (
        ["push", "--run_dir", str(broken), "--repo_id", "alice/x", "--token", ALICE],
        ["compare", str(broken)],
    ):
        with pytest.raises(SystemExit) as exit_info:  # the console script's own entry point, in-process
            main(command)
        assert exit_info.value.code == 2
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith(f"error: {message.format(run=broken)}")
    assert _snapshot(broken) == before

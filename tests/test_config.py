import dataclasses

import pytest

from cifar_accel.config import TrainConfig, parse_train_args
from cifar_accel.errors import UserError


def test_help_documents_every_setting_on_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_train_args(["--help"])
    assert exit_info.value.code == 0
    help_lines = capsys.readouterr().out.splitlines()
    for config_field in dataclasses.fields(TrainConfig):
        [line] = [
            line
            for line in help_lines
            if line.lstrip().startswith((f"--{config_field.name} ", f"--{config_field.name},"))
        ]
        assert config_field.metadata["help"] in line


def test_flags_are_parsed_into_typed_fields():
    config = parse_train_args(
        [
            "--learning_rate",
            "0.1",
            "--epochs",
            "3",
            "--no-nesterov",
            "--milestones",
            "0.3",
            "0.6",
            "--model",
            "bn_cnn",
            "--model_args",
            '{"conv_dropout": 0.1}',
            "--max_train_samples",
            "100",
            "--mixed_precision",
            "bf16",
        ]
    )
    assert config.learning_rate == 0.1 and config.epochs == 3 and config.nesterov is False
    assert config.milestones == [0.3, 0.6] and config.model_args == {"conv_dropout": 0.1}
    assert config.max_train_samples == 100 and config.mixed_precision == "bf16"
    assert parse_train_args([]) == TrainConfig()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "--epochs must be more than 0 and at most a million, got 0"),
        (["--epochs", "nan"], "--epochs must be more than 0 and at most a million, got nan"),
        (["--eval_epochs", "0"], "--eval_epochs must be at least 1, got 0"),
        (
            ["--eval_strategy", "no", "--validation_size", "10"],
            "--validation_size selects the best epoch; with --eval_strategy no nothing is selected",
        ),
        (["--compile_mode", "max-autotune"], "--compile_mode max-autotune needs --compile"),
        (["--muon_learning_rate", "0.1"], "--muon_learning_rate applies to --optimizer muon, not sgd"),
        (["--optimizer", "adamw", "--muon_momentum", "0.9"], "--muon_momentum applies to --optimizer muon, not adamw"),
        (["--optimizer", "muon", "--muon_momentum", "1"], "--muon_momentum must be in \\[0, 1\\), got 1$"),
        (["--optimizer", "muon", "--muon_learning_rate", "inf"], "--muon_learning_rate must be a positive finite"),
        (["--whiten_bias_decay"], "--whiten_bias_decay needs --whiten_bias_epochs"),
        (["--whiten_bias_lr_scale", "0"], "--whiten_bias_lr_scale must be a positive finite number, got 0"),
        (["--warmup_start_fraction", "1.5"], "--warmup_start_fraction must be in \\[0, 1\\], got 1.5"),
        (["--learning_rate", "-1"], "--learning_rate must be a positive finite number, got -1$"),
        (["--learning_rate", "inf"], "--learning_rate must be a positive finite number, got inf"),
        (["--learning_rate", "nan"], "--learning_rate must be a positive finite number, got nan"),
        (["--batch_size", "0"], "--batch_size must be 1 to 2\\^31, got 0"),
        (["--batch_size", str(10**20)], "--batch_size must be 1 to 2\\^31"),
        (["--milestones", "0.5", "0.5"], "--milestones must be increasing"),
        (
            ["--model", "bn_cnn", "--model_args", '{"conv_dropout": NaN}'],
            "conv_dropout must be a finite float, got nan",
        ),
        (
            ["--model", "bn_cnn", "--model_args", '{"conv_dropout": true}'],
            "conv_dropout must be a finite float, got True",
        ),
        (["--warmup_fraction", "1.5"], "--warmup_fraction must be in \\[0, 1\\], got 1.5"),
        (["--seed", "-1"], "--seed must be in \\[0, 2\\^32\\), got -1"),
        (["--seed", str(2**32)], "--seed must be in \\[0, 2\\^32\\)"),
        (["--momentum", "1"], "--momentum must be in \\[0, 1\\), got 1$"),
        (["--label_smoothing", "2"], "--label_smoothing must be in \\[0, 1\\), got 2$"),
        (["--crop_padding", "32"], "--crop_padding must be 0 to 31 \\(less than the image side\\), got 32"),
        (["--cutout", "40"], "--cutout must be 0 to 31 \\(smaller than the image\\), got 40"),
        (["--gamma", "-0.1"], "--gamma must be a positive finite number, got -0.1"),
        (["--milestones", "0.8", "0.5"], "--milestones must be increasing fractions of training in \\(0, 1\\)"),
        (["--milestones", "1.5"], "--milestones must be increasing fractions"),
        (["--num_workers", "1000"], "--num_workers must be 0 to 64, got 1000"),
        (["--weight_decay", "-1"], "--weight_decay must be zero or a positive finite number"),
        (["--mixup", "-0.2"], "--mixup must be 0 \\(off\\) or a positive finite alpha, got -0.2"),
        (["--cutmix", "inf"], "--cutmix must be 0 \\(off\\) or a positive finite alpha, got inf"),
        (["--model_ema", "1"], "--model_ema must be 0 \\(off\\) or a decay in \\(0, 1\\), got 1$"),
        (["--max_grad_norm", "0"], "--max_grad_norm must be a positive finite number, got 0$"),
        (["--max_train_steps", "0"], "--max_train_steps must be 1 to 2\\^31, got 0$"),
        (["--num_warmup_steps", "-1"], "--num_warmup_steps must be 0 to 2\\^31, got -1$"),
        (["--max_grad_norm", "nan"], "--max_grad_norm must be a positive finite number, got nan"),
        # Valid in float64, but 0 or infinite in the float32 tensors they become (torch's Beta refuses a 0 alpha).
        (["--cutmix", "1e-300"], "--cutmix must be at least 1.1755e-38 \\(the smallest normal float32, .*got 1e-300$"),
        (["--mixup", "1e-300"], "--mixup must be at least 1.1755e-38 \\(the smallest normal float32, .*got 1e-300$"),
        (["--mixup", "1e39"], "--mixup must be at most 3.4028e\\+38 \\(the largest float32\\), got 1e\\+39$"),
        (["--max_grad_norm", "1e-300"], "--max_grad_norm must be at least 1.1755e-38 .*, got 1e-300$"),
        (["--learning_rate", "1e-300"], "--learning_rate must be at least 1.1755e-38 .*, got 1e-300$"),
        # Digits that str.isdigit takes but are not ASCII: int() refuses '\u00b2' and reads '\u0663' as 3.
        (["--checkpointing_steps", "\u00b2"], "--checkpointing_steps must be a positive number .*, got '\u00b2'$"),
        (["--checkpointing_steps", "\u0663"], "--checkpointing_steps must be a positive number .*, got '\u0663'$"),
        (["--model_args", '{"widths": 5}'], "model 'resnet9' does not take widths"),
        (["--model", "bn_cnn", "--model_args", '{"conv_dropout": 2}'], "--model_args .*bn_cnn cannot be built"),
        (["--dataset", ""], "--dataset must name a Hub dataset or a folder"),
        (["--output_dir", "/proc/version"], "--output_dir /proc/version is a file; give a folder"),
        (["--output_dir", "/proc/version/run"], "--output_dir /proc/version/run cannot be created: /proc/version is a"),
    ],
)
def test_impossible_values_are_rejected_with_the_flag_name(argv, message):
    with pytest.raises(UserError, match=message):
        parse_train_args(argv)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optimizer", "adam"], "argument --optimizer: invalid choice: 'adam'"),
        (["--learning_rate", "fast"], "argument --learning_rate: 'fast' is not a number"),
        (["--model_args", "{oops"], "argument --model_args: not valid JSON"),
        (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    ],
)
def test_malformed_flags_are_one_line_errors_not_a_usage_dump(argv, message):
    with pytest.raises(UserError, match=message):
        parse_train_args(argv)


def test_a_recipe_sets_values_and_explicit_flags_override_it():
    config = parse_train_args(["--recipe", "resnet18", "--epochs", "3", "--nesterov"])
    assert (config.recipe, config.model, config.scheduler, config.learning_rate) == (
        "resnet18",
        "resnet18",
        "multistep",
        0.1,
    )
    assert config.epochs == 3 and config.nesterov is True  # given on the command line, over the recipe's false
    assert config.to_dict()["weight_decay"] == 1e-4  # the resolved value is what train_config.json records


def test_the_hugging_face_examples_flags_are_accepted_and_shown_beside_ours(capsys):
    config = parse_train_args(
        ["--dataset_name", "someone/pets", "--per_device_train_batch_size", "64", "--per_device_eval_batch_size",
         "100", "--num_train_epochs", "3", "--lr_scheduler_type", "cosine", "--with_tracking"]
    )  # fmt: skip
    assert (config.dataset, config.batch_size, config.eval_batch_size, config.epochs) == ("someone/pets", 64, 100, 3)
    assert (config.scheduler, config.report_to) == ("cosine", "all")
    assert parse_train_args(["--with_tracking", "--report_to", "tensorboard"]).report_to == "tensorboard"
    with pytest.raises(UserError, match="--batch_size must be 1 to 2\\^31, got 0"):
        parse_train_args(["--per_device_train_batch_size", "0"])
    with pytest.raises(SystemExit):
        parse_train_args(["--help"])
    help_lines = capsys.readouterr().out.splitlines()
    assert any(line.lstrip().startswith("--batch_size N, --per_device_train_batch_size N") for line in help_lines)
    assert sum("--per_device_train_batch_size" in line for line in help_lines) == 1


def test_onecycle_is_accepted_as_the_earlier_name_of_linear():
    assert parse_train_args(["--scheduler", "onecycle"]).scheduler == "linear"
    assert TrainConfig(scheduler="onecycle").to_dict()["scheduler"] == "linear"  # a saved config, a recipe


def test_auto_augment_none_turns_off_a_recipes_policy(tmp_path):
    recipe = tmp_path / "strong.yaml"
    recipe.write_text("auto_augment: cifar10\n")
    assert parse_train_args(["--recipe", str(recipe)]).auto_augment == "cifar10"
    assert parse_train_args(["--recipe", str(recipe), "--auto_augment", "none"]).auto_augment is None


def test_every_shipped_recipe_is_complete_and_valid():
    from cifar_accel.models import list_models
    from cifar_accel.recipes import list_recipes

    recipes = list_recipes()
    assert {
        "airbench94",
        "airbench96",
        "resnet18",
        "resnet18_darts",
        "superconvergence",
        "bn_cnn",
        "simple_cnn",
    } <= set(recipes)
    for name, description in recipes.items():
        assert description and "\n" not in description
        assert parse_train_args(["--recipe", name]).model in list_models()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("model: resnet18\nlearning_rte: 0.1\n", "sets unknown settings: learning_rte"),
        ("epochs: [1, 2\n", "is not valid YAML"),
        ("- just a list\n", "must be a mapping"),
        ("epochs: many\n", "recipe setting epochs: 'many' is not a valid float"),
        ("epochs: true\n", "recipe setting epochs: True is not a valid float"),
        ("eval_strategy: no\n", "eval_strategy: False is not a valid str \\(YAML reads a bare no/yes/on/off as"),
        ("nesterov: 1\n", "recipe setting nesterov: 1 is not a valid bool"),
        ("learning_rate: true\n", "recipe setting learning_rate: True is not a valid float"),
        ("learning_rate: .nan\n", "--learning_rate must be a positive finite number, got nan"),
        ("model_args: [1, 2]\n", "--model_args must be a JSON object, got \\[1, 2\\]"),
        ("milestones: 0.5\n", "recipe setting milestones: 0.5 is not a valid list"),
    ],
)
def test_a_bad_recipe_file_is_a_clear_error(tmp_path, content, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(content)
    with pytest.raises(UserError, match=message):
        parse_train_args(["--recipe", str(recipe)])


@pytest.mark.parametrize(
    ("content", "key", "lines"),
    [
        ("epochs: 3\nmodel: bn_cnn\nepochs: 5\n", "epochs", "lines 1 and 3"),
        ("model: bn_cnn\nmodel_args:\n  conv_dropout: 0.1\n  conv_dropout: 0.2\n", "conv_dropout", "lines 3 and 4"),
        ('{"epochs": 3, "epochs": 5}\n', "epochs", "line 1"),  # JSON, as a run's train_config.json
    ],
)
@pytest.mark.parametrize("flag", ["--recipe", "--config"])
def test_a_setting_given_twice_in_a_file_is_refused_naming_it_and_the_file(tmp_path, content, key, lines, flag):
    """YAML itself lets the last value win silently: which one did the author mean?"""
    settings = tmp_path / "settings.yaml"
    settings.write_text(content)
    source = "recipe" if flag == "--recipe" else "--config"
    with pytest.raises(UserError, match=f"^{source} '{settings}' sets {key} twice \\({lines}\\); keep one$"):
        parse_train_args([flag, str(settings)])


def test_a_yaml_merge_key_may_still_override_what_it_merges(tmp_path):
    """``<<`` copies a mapping's keys on purpose, so a key beside it replaces one of them without a refusal."""
    settings = tmp_path / "settings.yaml"
    settings.write_text("model: bn_cnn\nmodel_args:\n  <<: {conv_dropout: 0.1}\n  conv_dropout: 0.2\n")
    assert parse_train_args(["--recipe", str(settings)]).model_args == {"conv_dropout": 0.2}


def test_model_args_in_a_settings_file_may_be_the_json_text_the_command_line_takes(tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("model: bn_cnn\nmodel_args: '{\"conv_dropout\": 0.1}'\n")
    assert parse_train_args(["--recipe", str(settings)]).model_args == {"conv_dropout": 0.1}
    settings.write_text("model: bn_cnn\nmodel_args: '[0.1]'\n")
    with pytest.raises(UserError, match="--model_args must be a JSON object"):
        parse_train_args(["--recipe", str(settings)])


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(UserError, match="unknown recipe 'fastest'; choose one of: .*resnet18"):
        parse_train_args(["--recipe", "fastest"])

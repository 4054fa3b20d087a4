"""settings: the command line generated from TrainConfig, recipes, replay and the Hugging Face spellings."""

import dataclasses

import pytest

from cifar_accel.config import TrainConfig
from cifar_accel.errors import UserError
from cifar_accel.settings import parse_train_args


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
        config = parse_train_args(["--recipe", name])
        assert config.model in list_models() or config.uses_hub_model


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

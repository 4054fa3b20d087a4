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
            "--model_args",
            '{"dropout": 0.1}',
            "--max_train_samples",
            "100",
            "--mixed_precision",
            "bf16",
        ]
    )
    assert config.learning_rate == 0.1 and config.epochs == 3 and config.nesterov is False
    assert config.milestones == [0.3, 0.6] and config.model_args == {"dropout": 0.1}
    assert config.max_train_samples == 100 and config.mixed_precision == "bf16"
    assert parse_train_args([]) == TrainConfig()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "--epochs must be positive"),
        (["--learning_rate", "-1"], "--learning_rate must be positive"),
        (["--batch_size", "0"], "--batch_size must be positive"),
        (["--warmup_fraction", "1.5"], "--warmup_fraction must be between 0 and 1"),
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
        ("epochs: many\n", "recipe setting epochs: 'many' is not a valid int"),
    ],
)
def test_a_bad_recipe_file_is_a_clear_error(tmp_path, content, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(content)
    with pytest.raises(UserError, match=message):
        parse_train_args(["--recipe", str(recipe)])


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(UserError, match="unknown recipe 'fastest'; choose one of: .*resnet18"):
        parse_train_args(["--recipe", "fastest"])

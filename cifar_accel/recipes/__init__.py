"""Recipes: complete training settings in one visible YAML file each, loaded with ``--recipe NAME``.

A recipe file holds a one-line ``description`` and any ``TrainConfig`` settings. Flags given on
the command line override it, and ``train_config.json`` records the values that were used.
"""

from pathlib import Path

import yaml

from cifar_accel.errors import UserError

RECIPE_DIRECTORY = Path(__file__).parent


def list_recipes() -> dict[str, str]:
    """Shipped recipe names with their one-line descriptions."""
    return {path.stem: _read(path).get("description", "") for path in sorted(RECIPE_DIRECTORY.glob("*.yaml"))}


def load_recipe(name_or_path: str) -> dict:
    """The settings of a shipped recipe, or of a YAML/JSON file given by path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = RECIPE_DIRECTORY / f"{name_or_path}.yaml"
    if not path.is_file():
        raise UserError(f"unknown recipe {name_or_path!r}; choose one of: {', '.join(list_recipes())}, or a YAML file")
    settings = _read(path)
    settings.pop("description", None)
    return settings


def _read(path: Path) -> dict:
    try:
        content = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UserError(f"recipe {str(path)!r} is not valid YAML: {str(error).splitlines()[0]}") from None
    except OSError as error:
        raise UserError(f"recipe {str(path)!r} cannot be read ({error.strerror or error})") from None
    if not isinstance(content, dict):
        raise UserError(f"recipe {str(path)!r} must be a mapping of setting names to values")
    return content

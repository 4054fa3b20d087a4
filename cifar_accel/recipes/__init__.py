"""Recipes: complete training settings in one visible YAML file each, loaded with ``--recipe NAME``.

A recipe file holds a one-line ``description`` and any ``TrainConfig`` settings. Flags given on
the command line override it, and ``train_config.json`` records the values that were used.
"""

from pathlib import Path
from typing import Any

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


class DuplicateKeyError(yaml.constructor.ConstructorError):
    def __init__(self, key: object, first: yaml.Mark, second: yaml.Mark):
        first_line, second_line = first.line + 1, second.line + 1  # Marks count from 0
        lines = f"line {first_line}" if first_line == second_line else f"lines {first_line} and {second_line}"
        super().__init__(problem=f"sets {key} twice ({lines}); keep one", problem_mark=second)


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, refusing a mapping that gives a key twice: YAML would silently keep the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<' copies keys on purpose; those beside it win
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise DuplicateKeyError(key, seen[key], key_node.start_mark)
                seen[key] = key_node.start_mark
            except TypeError:  # an unhashable key: SafeLoader refuses it with its own message
                break
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path, source: str) -> Any:
    """A YAML file's content, a key given twice refused; each failure one line that begins with ``source``."""
    try:
        return yaml.load(Path(path).read_text(), Loader=UniqueKeyLoader)
    except DuplicateKeyError as error:
        raise UserError(f"{source} {error.problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UserError(f"{source} is not valid YAML: {str(error).splitlines()[0]}") from None
    except OSError as error:
        raise UserError(f"{source} cannot be read ({error.strerror or error})") from None


def _read(path: Path) -> dict:
    content = read_yaml(path, f"recipe {str(path)!r}")
    if not isinstance(content, dict):
        raise UserError(f"recipe {str(path)!r} must be a mapping of setting names to values")
    return content

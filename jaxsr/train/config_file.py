"""Config files as big_vision writes them: `path/to/file.py[:arg]` with `get_config(arg)`,
plus `--config.a.b=value` overrides on the command line.

    config = load_config("configs/seesr_train.py:tiny",
                         ["--config.total_steps=100", "--config.mesh=[('data',-1),('fsdp',2)]"])

An override must name an existing field; its value is parsed as a Python literal when
it is one (numbers, booleans, lists, tuples) and kept as a string otherwise, then
checked against the field's current type.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import ml_collections

PREFIX = "--config."


def load_config(spec: str, overrides=()) -> ml_collections.ConfigDict:
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {file} does not exist")
    root = str(file.resolve().parent.parent)
    if root not in sys.path:              # so `from configs import seesr` resolves
        sys.path.insert(0, root)
    module_spec = importlib.util.spec_from_file_location(f"_jaxsr_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{file} has no get_config(arg)")
    config = module.get_config(arg or None)
    for item in overrides:
        apply_override(config, item)
    return config


def _parse(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    if not item.startswith(PREFIX) or "=" not in item:
        raise ValueError(f"unrecognised argument {item!r}; overrides look like "
                         f"{PREFIX}key=value")
    dotted, _, text = item[len(PREFIX):].partition("=")
    *parents, leaf = dotted.split(".")
    node = config
    for i, name in enumerate(parents):
        if name not in node:
            raise ValueError(f"{PREFIX}{dotted}: config has no field "
                             f"{'.'.join(parents[:i + 1])!r}")
        node = node[name]
    if leaf not in node:
        raise ValueError(f"{PREFIX}{dotted}: config has no field {dotted!r} "
                         f"(fields here: {', '.join(sorted(node.keys()))})")
    old, value = node[leaf], _parse(text)
    if isinstance(old, bool) and not isinstance(value, bool):
        raise ValueError(f"{PREFIX}{dotted}: expected True or False, got {text!r}")
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, str) and not isinstance(value, str):
        value = text
    if old is not None and isinstance(value, list | tuple) and isinstance(old, list | tuple):
        value = type(old)(value)
    if old is not None and not isinstance(value, type(old)):
        raise ValueError(f"{PREFIX}{dotted}: expected {type(old).__name__}, got {text!r}")
    node[leaf] = value

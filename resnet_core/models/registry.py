"""A name -> builder registry in timm's style: each model is a three-line registered function.

``create_model(name, **overrides)`` is the one entry point; sweeps address the builders' keyword arguments
(``model.depth``, ``model.shortcut``, ``model.unit``, ``model.plain``) as overrides.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Callable

from torch import nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if builder.__name__ in _BUILDERS:
        raise ValueError(f"model {builder.__name__!r} is registered twice")
    _BUILDERS[builder.__name__] = builder
    return builder


def list_models(pattern: str = "*") -> list[str]:
    return sorted(name for name in _BUILDERS if fnmatch.fnmatchcase(name, pattern))


def is_model(name: str) -> bool:
    return name in _BUILDERS


def create_model(name: str, **overrides) -> nn.Module:
    """Build model ``name``; ``overrides`` replace its registered defaults (``depth=56``, ``shortcut="B"``)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(list_models())}")
    try:
        return _BUILDERS[name](**overrides)
    except TypeError as err:  # an unknown keyword: the option (a sweep's model.<option>), not the builder's name
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        raise ValueError(f"{unknown.group(1)}: model {name!r} has no such option" if unknown
                         else f"model {name!r}: {err}") from None

"""The one place structpeft touches transformers' attention internals, checked when imported.

Coeff-Tuning reaches transformers' attention through its ``AttentionInterface``: an attention module's
forward looks its function up by ``config._attn_implementation`` in the interface its module file imports
as ``ALL_ATTENTION_FUNCTIONS``. The mixed attention is put in that interface's ``_local_mapping`` for one
forward and taken out after; ``_global_mapping`` holds the functions it stands in for. Those two mappings
are private to transformers, so they are read and written here only, and their presence is checked at
import: a transformers release that renames them fails here, by name, rather than mid-forward.

Known to work: transformers 5.1 (the oldest release pyproject.toml declares; CI runs the attention tests
on it) to 5.25 (this project's tests). 5.0 calls eager attention directly and 4.x computes BERT-family
attention in its own code (see pyproject.toml).
"""

from __future__ import annotations

import inspect
from typing import Any

import transformers
from torch import nn
from transformers import AttentionInterface

KNOWN_VERSIONS = ("5.1", "5.25")
INTERFACE_GLOBAL = "ALL_ATTENTION_FUNCTIONS"  # the name attention modules' files import the interface under


def _check_private_names() -> None:
    missing = [name for name in ("_global_mapping",) if not hasattr(AttentionInterface, name)]
    missing += [name for name in ("_local_mapping",) if not hasattr(AttentionInterface(), name)]
    if missing:
        raise ImportError(
            f"transformers {transformers.__version__}'s AttentionInterface has no {', '.join(missing)}, which "
            f"Coeff-Tuning's attention hook uses; structpeft knows transformers {KNOWN_VERSIONS[0]} to "
            f"{KNOWN_VERSIONS[1]}: install one of those (pip install 'transformers>=5.1,<6')"
        )


_check_private_names()


def interface_of(module: nn.Module) -> Any:
    """The AttentionInterface ``module``'s forward looks its attention up in."""
    interface = inspect.unwrap(type(module).forward).__globals__.get(INTERFACE_GLOBAL)
    if interface is None:  # imported inside the forward: the library-wide instance
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as interface
    return interface


def local_entry(interface: Any, name: str, default: Any) -> Any:
    return interface._local_mapping.get(name, default)


def global_entry(interface: Any, name: str) -> Any:
    return interface._global_mapping.get(name)


def set_local_entry(interface: Any, name: str, function: Any) -> None:
    interface._local_mapping[name] = function


def remove_local_entry(interface: Any, name: str) -> None:
    interface._local_mapping.pop(name, None)

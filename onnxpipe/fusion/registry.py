"""Every fusion rule by name: the rule modules imported (importing one registers its rules in rules.RULES).

Apart from rules.py so that the rule modules, which take rules.py's register and PassContext, are not imported back
by it (no cycle between them).
"""

from __future__ import annotations

from typing import Any

from onnxpipe.fusion import attention, gelu, moe, norms, rotary  # noqa: F401 - importing registers their rules
from onnxpipe.fusion.rules import RULES


def all_rules() -> dict[str, list[Any]]:
    """Every registered rule."""
    return dict(RULES)

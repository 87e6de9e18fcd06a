"""The passes, one file each, all registered here.

A pass is a frozen dataclass with a `name` and `__call__(gm, regions) -> PassResult`; it changes the
graph only through the regions it is given and counts what it did (or why it skipped) in the result.
"""

from __future__ import annotations

from .lower import Lower

REGISTRY = {cls.name: cls for cls in (Lower,)}

__all__ = ["Lower", "REGISTRY"]

"""What the book's notebooks need beyond the techniques: naming a measured value for the prose.

``glue(name, value)`` hands a value to MyST-NB, which pastes it into the book's prose
(``{glue:text}`name```), so that the figures a page quotes are the ones its run measured.
Where MyST-NB is not installed (Colab, a plain Jupyter), the call does nothing: the value is
still printed and checked by the notebook itself.
"""
from __future__ import annotations

from typing import Any

try:
    from myst_nb import glue as _glue
except ImportError:  # not building the book: nothing to paste into
    _glue = None


def glue(name: str, value: Any) -> None:
    """Record ``value`` under ``name`` for the book's prose, without displaying it."""
    if _glue is not None:
        _glue(name, value, display=False)

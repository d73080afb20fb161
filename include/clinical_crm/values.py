"""How a value read from a vault or from staging is understood: missing, text, yes/no.

Staged frames hold text or missing values (see engine/staging.py); these three functions are
the one place that decides what counts as missing and what counts as Yes."""
from __future__ import annotations

import math
from typing import Any


def blank(value: Any) -> bool:
    """Missing in any of the ways a frame can say it (None, NaN, NA, empty text)."""
    if type(value) is str:  # nearly every staged value (called millions of times a run)
        return not value.strip()
    if value is None or type(value).__name__ == "NAType":
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def text(value: Any) -> str | None:
    """A value as trimmed text, or None when missing."""
    if type(value) is str:
        return value.strip() or None
    return None if blank(value) else str(value).strip()


def is_yes(value: Any) -> bool:
    """A Vault Yes/No (boolean) field, as staged text or a real bool."""
    if isinstance(value, bool):
        return value
    return (text(value) or "").lower() in ("true", "yes", "1")

"""Argument checks shared by the library, each written once.

Every check raises a `ValueError` that names the argument and the value
received (as Keras does: `... Received: name=value`), and never clamps or
coerces silently: a check that returns a value returns the argument as the
plain Python type it was checked as.
"""

import math
import numbers

import numpy as np

# What the MTP depths are trained to predict: the data's tokens ahead
# (`"labels"`) or the main head's own predictions (`"main"`).
MTP_TARGETS = ("labels", "main")


def check_int(value, name, minimum=0):
    """`value` as a Python int; a `ValueError` naming it unless it is an
    integer (NumPy's too, never a bool) `>= minimum`."""
    if (
        not isinstance(value, numbers.Integral)
        or isinstance(value, (bool, np.bool_))
        or value < minimum
    ):
        raise ValueError(
            f"`{name}` must be an int >= {minimum}. Received: "
            f"{name}={value!r} of type {type(value).__name__}"
        )
    return int(value)


def check_loss_scaling_factor(value):
    """Raises a `ValueError` unless `value` is a finite float >= 0."""
    try:
        ok = float(value) >= 0.0 and float(value) != float("inf")
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            "The MTP loss scaling factor (λ) must be a finite number >= 0. "
            f"Received: {value!r}"
        )


def check_mtp_targets(value):
    """Raises a `ValueError` unless `value` is one of `MTP_TARGETS`."""
    if not (isinstance(value, str) and value in MTP_TARGETS):
        raise ValueError(
            f"`mtp_targets` must be one of {MTP_TARGETS}. Received: "
            f"mtp_targets={value!r}"
        )


def check_loss_chunk_size(value):
    """`value` as an int, or None; a `ValueError` unless None or an int >= 1."""
    if value is None:
        return None
    return check_int(value, "loss_chunk_size", minimum=1)


def check_choice(value, name, choices):
    """Raises a `ValueError` naming `name` unless `value` is in `choices`."""
    if not (isinstance(value, str) and value in choices):
        raise ValueError(
            f"`{name}` must be one of {tuple(choices)}. Received: "
            f"{name}={value!r}"
        )


def number_text(
    kind,
    minimum=None,
    maximum=None,
    exclusive_minimum=None,
    exclusive_maximum=None,
    optional=False,
):
    """A range as text: `an int >= 1`, `a finite float in (0, 1)`."""
    low = high = None
    if minimum is not None:
        low = ("[", ">=", minimum)
    elif exclusive_minimum is not None:
        low = ("(", ">", exclusive_minimum)
    if maximum is not None:
        high = ("]", "<=", maximum)
    elif exclusive_maximum is not None:
        high = (")", "<", exclusive_maximum)
    text = "an int" if kind is int else "a finite float"
    if low and high:
        text += f" in {low[0]}{low[2]}, {high[2]}{high[0]}"
    elif low or high:
        _, sign, bound = low or high
        text += f" {sign} {bound}"
    return text + (" (or None)" if optional else "")


def check_number(value, name, kind, optional=False, **bounds):
    """`value` as a Python `kind` (int or float), or None if `optional`; a
    `ValueError` naming it unless it is an integer (`kind=int`; NumPy's
    too, never a bool) or a finite real number (`kind=float`) within
    `bounds`: `minimum`, `maximum` (inclusive), `exclusive_minimum`,
    `exclusive_maximum`, as in JSON Schema."""
    if value is None and optional:
        return None
    inf = float("inf")
    valid = (
        isinstance(value, numbers.Integral if kind is int else numbers.Real)
        and not isinstance(value, (bool, np.bool_))
        and math.isfinite(value)
        and value >= _bound(bounds, "minimum", -inf)
        and value > _bound(bounds, "exclusive_minimum", -inf)
        and value <= _bound(bounds, "maximum", inf)
        and value < _bound(bounds, "exclusive_maximum", inf)
    )
    if not valid:
        raise ValueError(
            f"`{name}` must be {number_text(kind, optional=optional, **bounds)}"
            f". Received: {name}={value!r}"
        )
    return kind(value)


def _bound(bounds, key, default):
    value = bounds.get(key)
    return default if value is None else value


def check_float(value, name, minimum=0.0, maximum=None):
    """`value` as a Python float; a `ValueError` naming it unless it is a
    finite real number (no bool) in `[minimum, maximum]`."""
    return check_number(value, name, float, minimum=minimum, maximum=maximum)

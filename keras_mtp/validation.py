"""Argument checks shared by the library, each written once.

Every check raises a `ValueError` that names the argument and the value
received (as Keras does: `... Received: name=value`), and never clamps or
coerces silently: a check that returns a value returns the argument as the
plain Python type it was checked as.
"""

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


def check_float(value, name, minimum=0.0, maximum=float("inf")):
    """`value` as a Python float; a `ValueError` naming it unless it is a
    finite real number (no bool) in `[minimum, maximum]`."""
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, (bool, np.bool_))
        or not minimum <= value <= maximum
        or value == float("inf")
    ):
        raise ValueError(
            f"`{name}` must be a finite number in [{minimum}, {maximum}]. "
            f"Received: {name}={value!r}"
        )
    return float(value)

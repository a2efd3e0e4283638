"""keras_mtp.validation: each check refuses bad values with a message that
names the argument and the value, and returns the plain Python value."""

import numpy as np
import pytest

from keras_mtp import distribution
from keras_mtp import mtp_block
from keras_mtp import validation


def test_check_int():
    assert validation.check_int(np.int64(3), "n") == 3
    assert type(validation.check_int(np.int64(3), "n")) is int
    for bad in (True, np.bool_(True), 2.0, "2", -1):
        with pytest.raises(ValueError, match=r"`n` must be an int >= 0"):
            validation.check_int(bad, "n")
    with pytest.raises(ValueError, match=r"Received: n=0 of type int"):
        validation.check_int(0, "n", minimum=1)


def test_check_float():
    assert validation.check_float(np.float32(0.5), "x", maximum=1.0) == 0.5
    for bad in (True, float("nan"), float("inf"), -0.1, 1.5, "0.5", None):
        with pytest.raises(ValueError, match=r"finite float in \[0.0, 1.0\]"):
            validation.check_float(bad, "x", maximum=1.0)


def test_check_choice_and_mtp_targets():
    validation.check_choice("data", "distribution", ("none", "data"))
    with pytest.raises(ValueError, match="Received: distribution='pipe'"):
        validation.check_choice("pipe", "distribution", ("none", "data"))
    validation.check_mtp_targets("main")
    with pytest.raises(ValueError, match="mtp_targets='teacher'"):
        validation.check_mtp_targets("teacher")


def test_loss_checks():
    validation.check_loss_scaling_factor(0)
    for bad in (-0.1, float("inf"), "a", None):
        with pytest.raises(ValueError, match="λ"):
            validation.check_loss_scaling_factor(bad)
    assert validation.check_loss_chunk_size(None) is None
    assert validation.check_loss_chunk_size(np.int32(8)) == 8
    with pytest.raises(ValueError, match="loss_chunk_size=0"):
        validation.check_loss_chunk_size(0)


def test_checks_are_written_once():
    # The model's module re-exports them; no second copy exists.
    assert mtp_block.check_int is validation.check_int
    assert distribution.check_int is validation.check_int


def test_make_distribution_checks_its_arguments():
    with pytest.raises(ValueError, match="distribution='pipeline'"):
        distribution.make_distribution("pipeline", "llama", 1, 8)
    with pytest.raises(ValueError, match="batch_size=0"):
        distribution.make_distribution("none", "llama", 1, 0)
    assert distribution.make_distribution("none", "llama", 1, 8) is None


def test_check_number_ranges():
    assert validation.check_number(None, "n", int, optional=True) is None
    assert validation.check_number(3, "n", int, minimum=1) == 3
    with pytest.raises(ValueError, match=r"`n` must be an int >= 1 \(or"):
        validation.check_number(0, "n", int, optional=True, minimum=1)
    with pytest.raises(ValueError, match=r"a finite float in \(0, 1\)"):
        validation.check_number(
            1.0, "f", float, exclusive_minimum=0, exclusive_maximum=1
        )

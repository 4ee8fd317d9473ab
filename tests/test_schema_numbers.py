"""The number tests of the row check (``shiq_data.schema``) answer plain ints and floats without the abstract-class
checks; these tests hold them to that definition on every kind of value a row can carry."""

from decimal import Decimal
from fractions import Fraction
from numbers import Integral, Real

import numpy as np
import pytest

from shiq_data.io import RowError
from shiq_data.schema import INT32_MAX, _is_int, check_row, is_finite_number, is_number


class _Int(int):
    pass


class _Float(float):
    pass


VALUES = [0, 1, -7, 2**70, 0.0, -1.5, float("nan"), float("inf"), True, False, np.True_, np.int64(3), np.int32(-1),
          np.uint8(2), np.float32(1.5), np.float64(2.0), Decimal("1.5"), Decimal("NaN"), Fraction(1, 3), _Int(4),
          _Float(0.5), "1", b"1", None, [1], 1j]  # fmt: skip


@pytest.mark.parametrize("x", VALUES, ids=repr)
def test_number_checks_match_their_definition(x):
    assert is_number(x) == (
        isinstance(x, (Real, Decimal, np.floating, np.integer)) and not isinstance(x, (bool, np.bool_))
    )
    assert _is_int(x) == (isinstance(x, (Integral, np.integer)) and not isinstance(x, (bool, np.bool_)))


def _row(**over):
    row = {
        "row_id": "r0",
        "source": "s",
        "group_id": 0,
        "prompt_len": 2,
        "tokens": [5, 6, 7],
        "action_mask": [False, False, True],
        "rewards": [0.0, 0.0, 1.0],
        "prompt": "p",
        "completion": "c",
        "reward": 1.0,
        "turn_rewards": None,
        "extra": None,
    }
    return {**row, **over}


@pytest.mark.parametrize(
    "over, field",
    [
        ({"group_id": True}, "group_id"),
        ({"prompt_len": 2.0}, "prompt_len"),
        ({"reward": True}, "reward"),
        ({"reward": float("nan")}, "reward"),
        ({"turn_rewards": [1.0, False]}, "turn_rewards"),
        ({"tokens": [5, 6, INT32_MAX + 1]}, "tokens"),
    ],  # fmt: skip
)
def test_check_row_still_refuses_what_is_not_a_number(over, field):
    check_row(_row(), vocab_size=None, file="f", row_index=0)
    assert is_finite_number(1) and not is_finite_number(True)
    with pytest.raises(RowError) as e:
        check_row(_row(**over), vocab_size=None, file="f", row_index=0)
    assert e.value.field == field

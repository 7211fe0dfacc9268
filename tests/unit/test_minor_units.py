"""Bills round to each currency's own minor unit, as ISO 4217 lists it."""

from decimal import Decimal

import pytest

from billing_service.domain.bill import round_money


@pytest.mark.parametrize(
    ("currency", "rounded"),
    [
        ("EUR", "123.46"),
        ("ISK", "123"),
        ("JPY", "123"),
        ("CLP", "123"),
        ("VND", "123"),
        ("KWD", "123.456"),
        ("IQD", "123.456"),
        ("LYD", "123.456"),
        ("CLF", "123.4560"),
    ],
)
def test_amounts_round_half_up_to_the_currency_minor_unit(currency: str, rounded: str) -> None:
    assert str(round_money(Decimal("123.456"), currency)) == rounded

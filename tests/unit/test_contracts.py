"""service.contracts: the current futures contract follows the exchange's calendar.

Pure: no database, no clock; every day and instant is given.
"""

from __future__ import annotations

import tomllib
from datetime import UTC, date, datetime, time

import pytest

from pgleader.errors import ConfigError
from service.contracts import (
    Calendar,
    Contract,
    ContractError,
    ContractRule,
    contract_symbol,
    parse_calendar,
    parse_contract,
)

REPUBLIC_DAY = date(2026, 1, 26)  # a Monday, the day before January's last Tuesday
NFO = Calendar("NFO", holidays=frozenset({REPUBLIC_DAY}))
NIFTY = ContractRule("NIFTY", expiry="last-tuesday")
WHERE = "instruments file x.toml"
AT = f"{WHERE}: [instruments.CRUDE]"


def utc(year: int, month: int, day: int, hour: int, minute: int, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


@pytest.mark.parametrize(
    ("underlying", "expiry", "symbol"),
    [
        ("NIFTY", date(2026, 12, 29), "NIFTY29DEC26FUT"),
        ("CRUDEOILM", date(2024, 5, 20), "CRUDEOILM20MAY24FUT"),
        ("M&M", date(2026, 1, 6), "M&M06JAN26FUT"),
    ],
)
def test_symbol_is_base_day_month_year_and_fut(underlying: str, expiry: date, symbol: str):
    assert contract_symbol(underlying, expiry) == symbol


def test_a_lower_case_underlying_makes_no_symbol():
    with pytest.raises(ValueError, match="upper-case"):
        contract_symbol("nifty", date(2026, 12, 29))


def test_last_tuesday_of_each_month_including_a_five_tuesday_month():
    plain = Calendar("NFO")
    expiries = NIFTY.expiry_dates(plain, date(2026, 1, 1), months=4)
    # March 2026 has five Tuesdays: the 31st, not the 24th.
    assert expiries == [date(2026, 1, 27), date(2026, 2, 24), date(2026, 3, 31), date(2026, 4, 28)]


def test_expiries_already_past_in_the_start_month_are_skipped():
    assert NIFTY.expiry_dates(NFO, date(2026, 1, 28)) == [date(2026, 2, 24), date(2026, 3, 31)]
    assert NIFTY.expiry_dates(NFO, date(2026, 1, 27), months=1) == [date(2026, 1, 27)]


def test_last_thursday_rule_gives_bse_expiries():
    sensex = ContractRule("SENSEX", expiry="last-thursday")
    assert sensex.expiry_dates(Calendar("BFO"), date(2026, 12, 1), months=2) == [
        date(2026, 12, 31),
        date(2027, 1, 28),
    ]


def test_last_tuesday_on_a_holiday_moves_to_the_previous_trading_day():
    calendar = Calendar("NFO", holidays=frozenset({date(2026, 3, 31)}))
    assert NIFTY.expiry_dates(calendar, date(2026, 3, 1), months=1) == [date(2026, 3, 30)]
    assert NIFTY.contract_on(calendar, date(2026, 3, 27)).symbol == "NIFTY30MAR26FUT"


def test_expiry_moves_back_over_two_holidays_and_a_weekend():
    calendar = Calendar("NFO", holidays=frozenset({date(2026, 3, 30), date(2026, 3, 31)}))
    assert NIFTY.expiry_dates(calendar, date(2026, 3, 1), months=1) == [date(2026, 3, 27)]


def test_trading_days_before_skip_a_weekend_and_a_holiday():
    tuesday = date(2026, 1, 27)
    assert NFO.trading_days_before(tuesday, 0) == tuesday
    assert NFO.trading_days_before(tuesday, 1) == date(2026, 1, 23)  # Friday: Monday is a holiday
    assert NFO.trading_days_before(tuesday, 2) == date(2026, 1, 22)
    assert NFO.trading_days_before(date(2026, 1, 25), 0) == date(2026, 1, 23)  # Sunday -> Friday
    assert NFO.trading_days_before(date(2026, 1, 25), 1) == date(2026, 1, 22)


def test_roll_window_starts_roll_days_before_the_expiry_in_trading_days():
    rule = ContractRule("NIFTY", expiry="last-tuesday", roll_days_before=2)
    assert rule.roll_start(NFO, date(2026, 1, 27)) == date(2026, 1, 22)
    january = Contract(date(2026, 1, 27), "NIFTY27JAN26FUT")
    february = Contract(date(2026, 2, 24), "NIFTY24FEB26FUT")
    assert rule.contract_on(NFO, date(2026, 1, 21)) == january  # the day before the roll
    assert rule.contract_on(NFO, date(2026, 1, 22)) == february  # the roll starts
    assert rule.contract_on(NFO, date(2026, 1, 27)) == february  # expiry day
    assert rule.contract_on(NFO, date(2026, 1, 28)) == february
    assert january < february


def test_without_roll_days_the_roll_starts_on_expiry_day():
    assert NIFTY.roll_start(NFO, date(2026, 1, 27)) == date(2026, 1, 27)
    assert NIFTY.contract_on(NFO, date(2026, 1, 23)).symbol == "NIFTY27JAN26FUT"
    assert NIFTY.contract_on(NFO, date(2026, 1, 27)).symbol == "NIFTY24FEB26FUT"


def test_next_after_gives_the_following_contract():
    assert NIFTY.next_after(NFO, date(2026, 12, 29)) == Contract(
        date(2027, 1, 26), "NIFTY26JAN27FUT"
    )


MCX = Calendar("MCX", session=(time(9, 0), time(23, 30)))
CRUDE = ContractRule(
    "CRUDEOILM",
    expiries=(date(2024, 5, 20), date(2024, 6, 19), date(2024, 7, 20)),  # July's is a Saturday
    roll_days_before=1,
)


def test_explicit_expiries_are_used_and_moved_off_non_trading_days():
    assert CRUDE.expiry_dates(MCX, date(2024, 5, 21)) == [date(2024, 6, 19), date(2024, 7, 19)]
    assert CRUDE.contract_on(MCX, date(2024, 5, 16)).symbol == "CRUDEOILM20MAY24FUT"
    assert CRUDE.contract_on(MCX, date(2024, 5, 17)).symbol == "CRUDEOILM19JUN24FUT"
    assert CRUDE.next_after(MCX, date(2024, 6, 19)).symbol == "CRUDEOILM19JUL24FUT"


def test_an_exhausted_expiries_list_asks_for_more_dates():
    with pytest.raises(ContractError, match=r"CRUDEOILM: .* add the next expiries") as caught:
        CRUDE.contract_on(MCX, date(2024, 7, 18))  # July's roll has started: nothing after it
    assert isinstance(caught.value, ConfigError)
    with pytest.raises(ContractError, match="CRUDEOILM"):
        CRUDE.next_after(MCX, date(2024, 7, 19))


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        (utc(2026, 1, 27, 3, 44, 59), False),  # 09:14:59 in Kolkata
        (utc(2026, 1, 27, 3, 45), True),  # 09:15, the open
        (utc(2026, 1, 27, 9, 59, 59), True),  # 15:29:59
        (utc(2026, 1, 27, 10, 0), False),  # 15:30, the close
        (utc(2026, 1, 24, 5, 0), False),  # a Saturday
        (utc(2026, 1, 26, 5, 0), False),  # Republic Day
    ],
)
def test_in_session_from_open_until_close_on_trading_days_only(at: datetime, expected: bool):
    assert NFO.in_session(at) is expected


def test_the_exchange_date_is_its_local_date():
    assert NFO.local_date(utc(2026, 1, 26, 19, 0)) == date(2026, 1, 27)  # 00:30 in Kolkata
    with pytest.raises(ValueError, match="no time zone"):
        NFO.in_session(datetime(2026, 1, 27, 10, 0))


def test_a_calendar_table_is_read_from_toml():
    document = tomllib.loads(
        '[calendars.MCX]\nholidays = [2026-01-26, "2026-03-03"]\nsession = "09:00-23:30"\n'
        'timezone = "Asia/Kolkata"\nweekdays = ["Mon", "Tue", "Wed", "Thu", "Fri"]\n'
    )
    calendar = parse_calendar(WHERE, "MCX", document["calendars"]["MCX"])
    holidays = frozenset({REPUBLIC_DAY, date(2026, 3, 3)})
    assert calendar == Calendar("MCX", session=(time(9, 0), time(23, 30)), holidays=holidays)
    assert parse_calendar(WHERE, "NFO", {}) == Calendar("NFO")


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("yes", "must be a table with keys holidays"),
        ({"holiday": []}, "unknown key holiday (known keys: holidays"),
        ({"holidays": "2026-01-26"}, "holidays must be a list of dates"),
        ({"holidays": ["26-01-2026"]}, "holidays[0] must be a date such as 2026-01-26"),
        ({"holidays": [REPUBLIC_DAY, "2026-02-30"]}, "holidays[1] must be a date"),
        ({"holidays": [datetime(2026, 1, 26, 9, 0)]}, "holidays[0] must be a date"),
        ({"session": "9:15-15:30"}, 'session must be "HH:MM-HH:MM"'),
        ({"session": "09:15-24:00"}, 'session must be "HH:MM-HH:MM"'),
        ({"session": "15:30-09:15"}, "session must close after it opens, got 15:30-09:15"),
        ({"timezone": "Asia/Mumbai"}, "timezone 'Asia/Mumbai' is not an IANA time zone"),
        ({"timezone": 5}, "timezone must be a string, got 5"),
        ({"weekdays": "Mon"}, "weekdays must be a list"),
        ({"weekdays": ["Mon", "Tues"]}, "weekdays[1] must be one of Mon Tue"),
        ({"weekdays": []}, "weekdays must name at least one"),
    ],
)
def test_a_bad_calendar_is_refused_in_one_line_naming_the_key(table: object, expected: str):
    with pytest.raises(ConfigError) as caught:
        parse_calendar(WHERE, "NFO", table)
    message = str(caught.value)
    assert message.startswith(f"{WHERE}: [calendars.NFO]: ")
    assert expected in message
    assert "\n" not in message


def test_a_contract_rule_is_read_from_an_instrument_table():
    table = {"exchange": "NFO", "underlying": "NIFTY", "expiry": "last-tuesday"}
    assert parse_contract(AT, table, NFO, exchange="NFO") == NIFTY
    listed = {"underlying": "CRUDEOILM", "expiries": [date(2024, 5, 20), "2024-06-19"]}
    rule = parse_contract(AT, {**listed, "roll_days_before": 3}, MCX, exchange="MCX")
    assert rule == ContractRule("CRUDEOILM", None, (date(2024, 5, 20), date(2024, 6, 19)), 3)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"expiry": "last-tuesday"}, "underlying is required"),
        ({"underlying": 7, "expiry": "last-tuesday"}, "underlying must be a string"),
        ({"underlying": "nifty", "expiry": "last-tuesday"}, "underlying must be upper-case"),
        ({"underlying": "NIFTY"}, 'expiry (e.g. "last-tuesday") or expiries'),
        (
            {"underlying": "NIFTY", "expiry": "last-tuesday", "expiries": ["2026-01-27"]},
            "give expiry or expiries, not both",
        ),
        ({"underlying": "NIFTY", "expiry": "last-tue"}, "expiry must be one of last-monday"),
        ({"underlying": "NIFTY", "expiry": 2}, "expiry must be a string"),
        ({"underlying": "GOLD", "expiries": []}, "expiries is empty"),
        ({"underlying": "GOLD", "expiries": ["2026-06-05", "2026-05-05"]}, "ascending order"),
        ({"underlying": "GOLD", "expiries": ["2026-06-05", "2026-06-05"]}, "without repeats"),
        ({"underlying": "GOLD", "expiries": ["June"]}, "expiries[0] must be a date"),
        ({"underlying": "GOLD", "expiries": ["2026-06-05"], "roll_days_before": True}, "whole"),
        ({"underlying": "GOLD", "expiries": ["2026-06-05"], "roll_days_before": 1.5}, "whole"),
        ({"underlying": "GOLD", "expiries": ["2026-06-05"], "roll_days_before": 21}, "0 to 20"),
        ({"underlying": "GOLD", "expiries": ["2026-06-05"], "roll_days_before": -1}, "0 to 20"),
    ],
)
def test_a_bad_contract_rule_is_refused_in_one_line_naming_the_key(
    table: dict[str, object], expected: str
):
    with pytest.raises(ConfigError) as caught:
        parse_contract(AT, table, MCX, exchange="MCX")
    message = str(caught.value)
    assert message.startswith(f"{AT}: ")
    assert expected in message
    assert "\n" not in message


def test_a_contract_rule_without_its_exchange_calendar_asks_for_one():
    table = {"underlying": "CRUDEOILM", "expiries": ["2024-05-20"]}
    with pytest.raises(ConfigError, match=r"add a \[calendars.MCX\] table") as caught:
        parse_contract(AT, table, None, exchange="MCX")
    assert "\n" not in str(caught.value)

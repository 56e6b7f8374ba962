"""service.instruments: the instruments file is read exactly, or refused in one line.

Pure parsing: no database, no network.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import pytest

from pgleader.errors import ConfigError
from service.brokers.base import Instrument
from service.contracts import Calendar, ContractRule
from service.instruments import load_instruments, settings_fingerprint

ROOT = Path(__file__).resolve().parents[2]

VALID = """\
# comments and blank lines are fine

[instruments.NIFTY_FUT]
exchange = "NFO"
symbol = "NIFTY29DEC26FUT"
product = "NRML"
lot_size = 75
max_lots = 10

[instruments."NSE:RELIANCE"]
exchange = "NSE"
symbol = "RELIANCE"
product = "CNC"
lot_size = 1

[instruments.BANKNIFTY_FUT]
exchange = "NFO"
symbol = "BANKNIFTY29DEC26FUT"
product = "MIS"
lot_size = 30
"""

BASE = """\
[instruments.NIFTY_FUT]
exchange = "NFO"
symbol = "NIFTY29DEC26FUT"
lot_size = 75
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "instruments.toml"
    path.write_text(text, encoding="utf-8")
    return path


def refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_instruments(path)
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message, message
    assert message.isprintable(), message
    assert str(path) in message, message
    return message


def base_with(line: str) -> str:
    """BASE's one instrument with `line` replacing the line of the same key (or added)."""
    key = line.split("=")[0].strip()
    kept = [row for row in BASE.splitlines() if row.split("=")[0].strip() != key]
    return "\n".join([*kept, line]) + "\n"


def base_without(key: str) -> str:
    return "\n".join(row for row in BASE.splitlines() if not row.startswith(f"{key} ")) + "\n"


# --- what a valid file gives ---------------------------------------------------------


def test_a_valid_file_gives_every_instrument_in_the_files_order(tmp_path):
    instruments = load_instruments(write(tmp_path, VALID))

    assert list(instruments) == ["NIFTY_FUT", "NSE:RELIANCE", "BANKNIFTY_FUT"]
    assert instruments["NIFTY_FUT"] == Instrument(
        name="NIFTY_FUT",
        exchange="NFO",
        symbol="NIFTY29DEC26FUT",
        product="NRML",
        lot_size=75,
        max_lots=10,
    )
    assert instruments["NSE:RELIANCE"] == Instrument(
        name="NSE:RELIANCE", exchange="NSE", symbol="RELIANCE", product="CNC", lot_size=1
    )
    assert instruments["BANKNIFTY_FUT"].product == "MIS"


def test_product_defaults_to_nrml_and_max_lots_to_none(tmp_path):
    instrument = load_instruments(write(tmp_path, BASE))["NIFTY_FUT"]

    assert instrument.product == "NRML"
    assert instrument.max_lots is None


def test_names_are_matched_as_the_webhook_writes_them_in_upper_case(tmp_path):
    text = BASE.replace("NIFTY_FUT]", "nifty_fut]")

    assert list(load_instruments(write(tmp_path, text))) == ["NIFTY_FUT"]


def test_two_names_equal_but_for_case_are_refused(tmp_path):
    text = BASE + BASE.replace("NIFTY_FUT]", "nifty_fut]").replace("NIFTY29", "NIFTY30")

    assert "appears twice" in refusal(write(tmp_path, text))


def test_two_instruments_trading_one_symbol_are_refused(tmp_path):
    text = BASE + BASE.replace("NIFTY_FUT]", "OTHER]")

    assert "fight over one position" in refusal(write(tmp_path, text))


def test_a_name_the_webhook_cannot_send_is_refused(tmp_path):
    text = BASE.replace("NIFTY_FUT]", '"NIFTY FUT"]')

    assert "may contain only" in refusal(write(tmp_path, text))


def test_every_exchange_and_product_listed_is_accepted(tmp_path):
    for exchange in ("NSE", "NFO", "CDS", "BSE", "BFO", "BCD", "MCX", "NCDEX", "NCO"):
        for product in ("NRML", "MIS", "CNC"):
            text = base_with(f'exchange = "{exchange}"') + f'product = "{product}"\n'
            instrument = load_instruments(write(tmp_path, text))["NIFTY_FUT"]
            assert (instrument.exchange, instrument.product) == (exchange, product)


def test_a_name_of_64_characters_is_accepted(tmp_path):
    name = "N" * 64
    text = BASE.replace("NIFTY_FUT", name)

    assert list(load_instruments(write(tmp_path, text))) == [name]


# --- the file itself -----------------------------------------------------------------


def test_a_missing_file_is_refused(tmp_path):
    message = refusal(tmp_path / "absent.toml")

    assert "cannot be read" in message
    assert "No such file" in message


def test_a_directory_is_refused(tmp_path):
    assert "cannot be read" in refusal(tmp_path)


def test_a_file_that_is_not_toml_is_refused_with_the_line(tmp_path):
    message = refusal(write(tmp_path, BASE + "lot_size: 75\n"))

    assert "not valid TOML" in message
    assert "line 5" in message


def test_a_file_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "instruments.toml"
    path.write_bytes(BASE.encode() + b"# \xff\n")

    assert "not UTF-8" in refusal(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "no [instruments] table"),
        ("# only a comment\n", "no [instruments] table"),
        ("[instruments]\n", "[instruments] table is empty"),
        ("instruments = 3\n", "instruments must be a table"),
        ('instruments = ["NIFTY_FUT"]\n', "instruments must be a table"),
    ],
)
def test_a_file_without_instruments_is_refused(tmp_path, text, expected):
    assert expected in refusal(write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[NIFTY_FUT]\nexchange = 'NFO'\n" + BASE, "NIFTY_FUT"),
        ('broker = "paper"\n' + BASE, "broker"),
        ("[instrument.NIFTY_FUT]\nlot_size = 1\n" + BASE, "instrument"),
    ],
)
def test_an_unknown_top_level_key_is_refused_by_name(tmp_path, text, key):
    message = refusal(write(tmp_path, text))

    assert f"unknown top-level key {key}" in message


# --- one instrument ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        # unknown keys
        (base_with("lots = 2"), "lots", "unknown key lots"),
        (base_with('Symbol = "X"'), "Symbol", "unknown key Symbol"),
        (base_with("contract = { month = 'near' }"), "contract", "unknown key contract"),
        # missing keys
        (base_without("exchange"), "exchange", "exchange is required"),
        (base_without("symbol"), "symbol", "give either symbol"),
        (base_without("lot_size"), "lot_size", "lot_size is required"),
        # wrong types
        (base_with("exchange = 1"), "exchange", "must be a string"),
        (base_with("exchange = ['NFO']"), "exchange", "must be a string"),
        (base_with("symbol = 123"), "symbol", "must be a string"),
        (base_with("product = true"), "product", "must be a string"),
        (base_with('lot_size = "75"'), "lot_size", "must be a whole number"),
        (base_with("lot_size = 75.0"), "lot_size", "must be a whole number"),
        (base_with("lot_size = true"), "lot_size", "must be a whole number"),
        (base_with("max_lots = false"), "max_lots", "must be a whole number"),
        (base_with("max_lots = 2.5"), "max_lots", "must be a whole number"),
        (base_with("max_lots = '10'"), "max_lots", "must be a whole number"),
        # impossible numbers
        (base_with("lot_size = 0"), "lot_size", "must be at least 1, got 0"),
        (base_with("lot_size = -75"), "lot_size", "must be at least 1, got -75"),
        (base_with("max_lots = 0"), "max_lots", "must be at least 1, got 0"),
        (base_with("max_lots = -1"), "max_lots", "must be at least 1, got -1"),
        # values out of their lists
        (base_with('exchange = "nfo"'), "exchange", "must be one of NSE NFO"),
        (base_with('exchange = "NYSE"'), "exchange", "got 'NYSE'"),
        (base_with('exchange = ""'), "exchange", "must be one of"),
        (base_with('product = "MARGIN"'), "product", "must be one of NRML MIS CNC"),
        (base_with('product = "nrml"'), "product", "got 'nrml'"),
        # symbols
        (base_with('symbol = ""'), "symbol", "symbol is empty"),
        (base_with('symbol = "NIFTY\\nFUT"'), "symbol", "non-printable"),
        (base_with('symbol = "NIFTY\\tFUT"'), "symbol", "non-printable"),
        (base_with('symbol = "NIFTY\\u0000"'), "symbol", "non-printable"),
        (base_with('symbol = " NIFTY29DEC26FUT"'), "symbol", "starts or ends with a space"),
    ],
)
def test_a_bad_instrument_is_refused_naming_the_instrument_and_the_key(
    tmp_path, text, key, expected
):
    message = refusal(write(tmp_path, text))

    assert "[instruments.NIFTY_FUT]" in message
    assert key in message
    assert expected in message


def test_an_instrument_that_is_not_a_table_is_refused(tmp_path):
    message = refusal(write(tmp_path, '[instruments]\nNIFTY_FUT = "NIFTY29DEC26FUT"\n'))

    assert "[instruments.NIFTY_FUT]" in message
    assert "must be a table" in message


def test_a_missing_symbol_asks_for_a_symbol_or_a_contract_rule(tmp_path):
    message = refusal(write(tmp_path, base_without("symbol")))

    assert "give either symbol" in message
    assert "underlying" in message


CONTRACT = """
[calendars.NFO]
holidays = [2026-12-29]

[instruments."NIFTY1!"]
exchange = "NFO"
underlying = "NIFTY"
expiry = "last-tuesday"
roll_days_before = 2
lot_size = 75
"""


def test_a_future_names_its_contract_rule_and_its_exchange_calendar(tmp_path):
    (instrument,) = load_instruments(write(tmp_path, CONTRACT)).values()

    assert instrument.name == "NIFTY1!"
    assert instrument.contract is not None and instrument.calendar is not None
    # 2026-12-29, the last Tuesday, is a holiday here: the contract expires on the 28th
    contract = instrument.contract.contract_on(instrument.calendar, date(2026, 12, 1))
    assert contract.symbol == "NIFTY28DEC26FUT"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            CONTRACT.replace('underlying = "NIFTY"', 'underlying = "NIFTY"\nsymbol = "X"'),
            "not both",
        ),
        (CONTRACT.replace("[calendars.NFO]", "[calendars.NFOX]"), "[calendars.NFOX]"),
        (CONTRACT.replace('expiry = "last-tuesday"', ""), "expiry"),
        (CONTRACT.replace("[calendars.NFO]\nholidays = [2026-12-29]", ""), "[calendars.NFO]"),
        (BASE + "roll_days_before = 1\n", "belongs to a contract rule"),
    ],
)
def test_a_bad_contract_rule_is_one_line_naming_it(tmp_path, text, expected):
    message = refusal(write(tmp_path, text))

    assert expected in message
    assert "\n" not in message


def test_the_first_bad_instrument_is_named_not_the_good_ones(tmp_path):
    bad = BASE.replace("NIFTY_FUT", "SENSEX_FUT").replace('"NFO"', '"BSEX"')

    message = refusal(write(tmp_path, BASE + bad))

    assert "[instruments.SENSEX_FUT]" in message
    assert "NIFTY_FUT" not in message


@pytest.mark.parametrize(
    ("header", "shown", "expected"),
    [
        ('[instruments.""]', '[instruments.""]', "name is empty"),
        ('[instruments."NIFTY\\nFUT"]', '[instruments."NIFTY\\nFUT"]', "non-printable"),
        ('[instruments."NIFTY\\u0007"]', '[instruments."NIFTY\\u0007"]', "non-printable"),
        ('[instruments."NIFTY\\u200b"]', '[instruments."NIFTY\\u200b"]', "non-printable"),
        ('[instruments." NIFTY"]', '[instruments." NIFTY"]', "starts or ends with a space"),
        (f"[instruments.{'N' * 65}]", f"[instruments.{'N' * 65}]", "longer than 64"),
    ],
)
def test_a_bad_instrument_name_is_refused_and_shown_on_one_line(tmp_path, header, shown, expected):
    text = BASE.replace("[instruments.NIFTY_FUT]", header)

    message = refusal(write(tmp_path, text))

    assert shown in message
    assert expected in message


def test_a_message_never_spans_lines_whatever_the_value(tmp_path):
    text = base_with('exchange = """N\nF\nO"""')

    message = refusal(write(tmp_path, text))

    assert "exchange" in message
    assert "'N\\nF\\nO'" in message


# --- the fingerprint -----------------------------------------------------------------

NIFTY = Instrument(
    name="NIFTY_FUT",
    exchange="NFO",
    symbol="NIFTY29DEC26FUT",
    product="NRML",
    lot_size=75,
    max_lots=10,
)
BANKNIFTY = Instrument(name="BANKNIFTY_FUT", exchange="NFO", symbol="BANKNIFTY29DEC26FUT")


def settings(**changes: object) -> dict[str, object]:
    parts: dict[str, object] = {
        "instruments": {NIFTY.name: NIFTY, BANKNIFTY.name: BANKNIFTY},
        "broker": "paper",
        "max_signal_age": timedelta(seconds=120),
        "request_timeout": 5.0,
        "allowed": frozenset({"NIFTY_FUT", "BANKNIFTY_FUT", "SENSEX_FUT"}),
        "networks": (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")),
        "operator_token": None,
    }
    parts.update(changes)
    return parts


def test_the_fingerprint_is_16_hex_characters():
    fp = settings_fingerprint(**settings())

    assert len(fp) == 16
    assert int(fp, 16) >= 0


def test_the_fingerprint_ignores_the_order_of_instruments_parts_and_sets(tmp_path):
    reordered = {
        name: value
        for name, value in reversed(
            settings(
                instruments={BANKNIFTY.name: BANKNIFTY, NIFTY.name: NIFTY},
                allowed=frozenset({"SENSEX_FUT", "BANKNIFTY_FUT", "NIFTY_FUT"}),
            ).items()
        )
    }

    assert settings_fingerprint(**reordered) == settings_fingerprint(**settings())


def test_the_fingerprint_of_a_file_ignores_the_order_of_its_tables(tmp_path):
    first, second = (tmp_path / "a", tmp_path / "b")
    first.mkdir()
    second.mkdir()
    blocks = VALID.split("\n\n")
    a = load_instruments(write(first, "\n\n".join(blocks)))
    b = load_instruments(write(second, "\n\n".join([blocks[0], *reversed(blocks[1:])])))

    assert list(a) != list(b)
    assert settings_fingerprint(instruments=a) == settings_fingerprint(instruments=b)


def test_the_fingerprint_is_the_same_in_another_process():
    """Set and dict order depend on the hash seed: another seed must not matter."""
    code = (
        "from tests.unit.test_instruments import settings;"
        "from service.instruments import settings_fingerprint;"
        "print(settings_fingerprint(**settings()))"
    )
    seen = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2", "3")
    }

    assert seen == {settings_fingerprint(**settings())}


@pytest.mark.parametrize(
    "change",
    [
        {"name": "NIFTY_FUT2"},
        {"exchange": "BFO"},
        {"symbol": "NIFTY26JAN27FUT"},
        {"product": "MIS"},
        {"lot_size": 65},
        {"max_lots": 11},
        {"max_lots": None},
        {"contract": ContractRule("NIFTY", expiry="last-tuesday")},
        {"contract": ContractRule("NIFTY", expiry="last-tuesday", roll_days_before=1)},
        {"calendar": Calendar("NFO")},
        {"calendar": Calendar("NFO", holidays=frozenset({date(2026, 12, 25)}))},
    ],
)
def test_any_change_to_an_instrument_changes_the_fingerprint(change):
    changed = dataclasses.replace(NIFTY, **change)

    before = settings_fingerprint(**settings())
    after = settings_fingerprint(
        **settings(instruments={NIFTY.name: changed, BANKNIFTY.name: BANKNIFTY})
    )

    assert before != after


def test_every_instrument_field_is_covered_by_the_changes_above():
    """A field added to Instrument later must be added to the test above too."""
    assert {f.name for f in dataclasses.fields(Instrument)} == {
        "name",
        "exchange",
        "symbol",
        "product",
        "contract",
        "calendar",
        "lot_size",
        "max_lots",
    }


def test_adding_or_removing_an_instrument_changes_the_fingerprint():
    both = settings_fingerprint(instruments={NIFTY.name: NIFTY, BANKNIFTY.name: BANKNIFTY})
    one = settings_fingerprint(instruments={NIFTY.name: NIFTY})
    renamed_key = settings_fingerprint(instruments={"OTHER": NIFTY, BANKNIFTY.name: BANKNIFTY})

    assert len({both, one, renamed_key}) == 3


@pytest.mark.parametrize(
    "change",
    [
        {"broker": "openalgo"},
        {"max_signal_age": timedelta(seconds=121)},
        {"max_signal_age": timedelta(seconds=120, microseconds=1)},
        {"request_timeout": 5.5},
        {"request_timeout": 5},
        {"allowed": frozenset({"NIFTY_FUT"})},
        {"allowed": None},
        {"networks": (ipaddress.ip_network("10.0.0.0/16"), ipaddress.ip_network("::1/128"))},
        {"operator_token": "set"},
        {"extra": 1},
    ],
)
def test_any_change_to_another_setting_changes_the_fingerprint(change):
    assert settings_fingerprint(**settings(**change)) != settings_fingerprint(**settings())


def test_the_fingerprint_tells_scalar_types_apart():
    values = [1, 1.0, "1", True, None]

    assert len({settings_fingerprint(x=value) for value in values}) == len(values)


def test_the_fingerprint_refuses_what_it_cannot_digest_stably():
    with pytest.raises(TypeError, match="object"):
        settings_fingerprint(x=object())
    with pytest.raises(TypeError, match="not a string"):
        settings_fingerprint(x={1: "a"})

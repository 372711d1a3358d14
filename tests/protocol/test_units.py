"""worker.protocol.units: sizes and durations written the same way everywhere."""
import pytest

from worker.protocol.units import (format_ago, format_bytes, format_duration, format_mib, format_share, parse_size,
                                   format_wait)


@pytest.mark.parametrize("n, text", [(0, "0 B"), (512, "512 B"), (1536, "1.5 KiB"), (2**31, "2 GiB"),
                                     (1024**2 * 1023.96, "1 GiB"), (150 * 1024**3, "150 GiB"), (None, "—")])
def test_format_bytes_uses_iec_units_with_one_decimal(n, text):
    assert format_bytes(n) == text


def test_format_bytes_refuses_a_negative_size():
    with pytest.raises(ValueError, match="negative"):
        format_bytes(-1)


def test_format_mib_and_share():
    assert format_mib(12.3 * 2**20) == "12.3 MiB" and format_mib(None) == "—"
    assert format_share(0.5) == "50 %" and format_share(0.125) == "12.5 %" and format_share(None) == "—"


@pytest.mark.parametrize("s, text", [(-3, "0 s"), (45, "45 s"), (900, "15 min"), (7200, "2 h"), (5400, "1 h 30 min")])
def test_format_duration(s, text):
    assert format_duration(s) == text


@pytest.mark.parametrize("ago, text", [(0.5, "just now"), (12, "12 s ago"), (180, "3 min ago"),
                                       (7200, "2 h ago"), (4 * 86400, "4 d ago")])
def test_format_ago(ago, text):
    assert format_ago(1000.0 - ago, 1000.0) == text
    assert format_ago(None, 1000.0) == "—"


@pytest.mark.parametrize("s, text", [(0.2, "1 second"), (30, "30 seconds"), (60, "1 minute"), (61, "2 minutes")])
def test_format_wait_rounds_up(s, text):
    assert format_wait(s) == text


@pytest.mark.parametrize("text, n", [("2000000000", 2000000000), ("512M", 512 * 2**20), ("2G", 2**31), ("2GB", 2**31),
                                     ("1.5GiB", 3 * 2**29), ("10 KiB", 10240), (".5k", 512)])
def test_parse_size_reads_binary_units(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "two gigs", "1.5", "-1G", "2X"])
def test_parse_size_refuses_what_is_not_a_size(text):
    with pytest.raises(ValueError, match="size|fraction"):
        parse_size(text)

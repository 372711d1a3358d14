"""Worker resources: the psutil snapshot, the engine speed benchmark and its cache,
and the admin's allocation (parsing, validation, wire form).

The snapshot is compared with psutil read directly; the benchmark runs the real model.
"""
from __future__ import annotations

import json
import math

import psutil
import pytest

from worker.engine import ModelLoadError
from worker.protocol import FlatObject
from worker.protocol.units import format_bytes
from worker.resources import (
    Allocation,
    AllocationError,
    cached_speed,
    default_allocation,
    measure_speed,
    parse_allocation,
    parse_cpu_share,
    parse_size,
    save_speed,
    snapshot,
)

GiB = 1 << 30
MiB = 1 << 20

#: What a worker with 15.5 GiB of RAM and 100 GiB free disk reports (the wire form of a snapshot).
REPORT = {"cpu_count": 4, "ram_total": int(15.5 * GiB), "ram_available": 8 * GiB,
          "disk_total": 500 * GiB, "disk_free": 100 * GiB}
CURRENT = Allocation(cpu_share=0.25, ram_bytes=1 * GiB, disk_bytes=5 * GiB)


# --- snapshot -----------------------------------------------------------------------


def test_snapshot_reports_the_machine_as_psutil_sees_it(tmp_path):
    snap = snapshot(tmp_path)

    assert snap["cpu_count"] == psutil.cpu_count(logical=True)
    assert snap["ram_total"] == psutil.virtual_memory().total
    assert 0 < snap["ram_available"] <= snap["ram_total"]
    disk = psutil.disk_usage(str(tmp_path))
    assert snap["disk_total"] == disk.total
    assert abs(snap["disk_free"] - disk.free) < 256 * MiB  # other processes write meanwhile
    assert 0.0 <= snap["cpu_percent"] <= 100.0
    assert snap["load_1m"] >= 0.0
    assert snap["platform"] and len(snap["platform"]) <= 64


def test_snapshot_field_types_are_json_scalars_the_protocol_accepts(tmp_path):
    snap = snapshot(tmp_path)

    for key in ("cpu_count", "ram_total", "ram_available", "disk_total", "disk_free"):
        assert type(snap[key]) is int, key
    for key in ("cpu_percent", "load_1m"):
        assert type(snap[key]) is float, key
    assert isinstance(snap["platform"], str)
    FlatObject().check(snap, "resources")  # raises InvalidPayload otherwise
    assert json.loads(json.dumps(snap)) == snap


def test_snapshot_of_a_data_dir_not_yet_created_uses_its_filesystem(tmp_path):
    snap = snapshot(tmp_path / "not" / "yet")

    assert snap["disk_total"] == psutil.disk_usage(str(tmp_path)).total


def test_snapshot_includes_speed_only_once_measured(tmp_path):
    assert "speed_tokens_s" not in snapshot(tmp_path)

    save_speed(tmp_path, 42.5, model_id="m1", tokens=16)

    assert snapshot(tmp_path)["speed_tokens_s"] == 42.5


# --- speed ----------------------------------------------------------------------------


def test_measure_speed_times_real_decode_steps(local_model):
    speed = measure_speed(tokens=4, model=local_model)

    assert math.isfinite(speed) and speed > 0


def test_measure_speed_leaves_no_session_behind(local_model):
    before = [set(stage.sessions()) for stage in local_model.pipeline.stages]  # other tests share the model
    measure_speed(tokens=2, model=local_model)

    assert [set(stage.sessions()) for stage in local_model.pipeline.stages] == before


def test_measure_speed_of_a_missing_model_file_says_so(tmp_path):
    with pytest.raises(ModelLoadError):
        measure_speed(tmp_path / "nope.gguf")


def test_measure_speed_needs_at_least_one_token(local_model):
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        measure_speed(tokens=0, model=local_model)


def test_cached_speed_round_trips_and_names_its_model(tmp_path):
    save_speed(tmp_path, 12.0, model_id="smollm2")

    assert cached_speed(tmp_path) == 12.0
    assert cached_speed(tmp_path, model_id="smollm2") == 12.0
    assert cached_speed(tmp_path, model_id="another-model") is None


@pytest.mark.parametrize("content", ["", "not json", "[]", '{"speed_tokens_s": "fast"}',
                                     '{"speed_tokens_s": -1}', '{"speed_tokens_s": true}', '{"other": 1}'])
def test_a_damaged_speed_cache_counts_as_not_measured(tmp_path, content):
    (tmp_path / "speed.json").write_text(content)

    assert cached_speed(tmp_path) is None
    assert "speed_tokens_s" not in snapshot(tmp_path)


@pytest.mark.parametrize("bad", [0, -3.0, math.inf, math.nan, True])
def test_save_speed_refuses_a_meaningless_speed(tmp_path, bad):
    with pytest.raises(ValueError):
        save_speed(tmp_path, bad)


# --- sizes and shares -------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("2000000000", 2_000_000_000), ("0", 0), ("512M", 512 * MiB), ("512m", 512 * MiB), ("2G", 2 * GiB),
    ("2GB", 2 * GiB), ("2GiB", 2 * GiB), ("1.5GiB", int(1.5 * GiB)), ("1.5 GiB", int(1.5 * GiB)),
    ("10K", 10240), ("1T", 1 << 40), ("100B", 100), (".5G", GiB // 2),
])
def test_parse_size_reads_binary_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "2X", "-1G", "1.5", "2 G B", "1e9", "two"])
def test_parse_size_refuses_what_is_not_a_size(text):
    with pytest.raises(AllocationError):
        parse_size(text)


@pytest.mark.parametrize("text, expected", [("50%", 0.5), ("100%", 1.0), ("12.5%", 0.125), ("0.5", 0.5), ("1", 1.0)])
def test_parse_cpu_share_reads_percent_or_fraction(text, expected):
    assert parse_cpu_share(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["0", "0%", "150%", "2", "-0.5", "half", "nan", "inf", "%"])
def test_parse_cpu_share_refuses_out_of_range(text):
    with pytest.raises(AllocationError, match="percentage"):
        parse_cpu_share(text)


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (512, "512 B"), (1024, "1 KiB"), (1536, "1.5 KiB"), (2 * GiB, "2 GiB"),
    (int(15.5 * GiB), "15.5 GiB"), (1024 * MiB - 1, "1 GiB"), (3 << 40, "3 TiB"),
])
def test_format_bytes_uses_iec_units_and_one_decimal(n, text):
    assert format_bytes(n) == text


def test_format_bytes_refuses_negative_sizes():
    with pytest.raises(ValueError):
        format_bytes(-1)


# --- allocation ------------------------------------------------------------------------


def test_allocation_round_trips_through_its_wire_form():
    a = Allocation(cpu_share=0.5, ram_bytes=2 * GiB, disk_bytes=10 * GiB)

    wire = a.to_wire()

    assert wire == {"cpu_share": 0.5, "ram_bytes": 2 * GiB, "disk_bytes": 10 * GiB}
    FlatObject().check(wire, "allocation")
    assert Allocation.from_wire(json.loads(json.dumps(wire))) == a


@pytest.mark.parametrize("wire", [
    {"cpu_share": 0.5, "ram_bytes": 1},
    {"cpu_share": 0.5, "ram_bytes": 1, "disk_bytes": 1, "gpu": 1},
    {"cpu_share": 0, "ram_bytes": 1, "disk_bytes": 1},
    {"cpu_share": 1.5, "ram_bytes": 1, "disk_bytes": 1},
    {"cpu_share": True, "ram_bytes": 1, "disk_bytes": 1},
    {"cpu_share": "50%", "ram_bytes": 1, "disk_bytes": 1},
    {"cpu_share": 0.5, "ram_bytes": -1, "disk_bytes": 1},
    {"cpu_share": 0.5, "ram_bytes": 1.5, "disk_bytes": 1},
    {"cpu_share": 0.5, "ram_bytes": 1, "disk_bytes": True},
    [0.5, 1, 1],
])
def test_allocation_from_a_bad_wire_form_is_refused(wire):
    with pytest.raises(AllocationError):
        Allocation.from_wire(wire)


def test_parse_allocation_reads_all_three_fields():
    a = parse_allocation("cpu=50% ram=2G disk=10G", REPORT, CURRENT)

    assert a == Allocation(cpu_share=0.5, ram_bytes=2 * GiB, disk_bytes=10 * GiB)


def test_parse_allocation_accepts_commas_fractions_and_any_case():
    a = parse_allocation("CPU=0.75, Ram=1.5GiB,disk=2000000000", REPORT, CURRENT)

    assert a == Allocation(cpu_share=0.75, ram_bytes=int(1.5 * GiB), disk_bytes=2_000_000_000)


def test_parse_allocation_keeps_current_values_for_missing_fields():
    a = parse_allocation("ram=4G", REPORT, CURRENT)

    assert a == Allocation(cpu_share=CURRENT.cpu_share, ram_bytes=4 * GiB, disk_bytes=CURRENT.disk_bytes)


def test_asking_for_more_ram_than_the_worker_has_says_how_much_it_has():
    with pytest.raises(AllocationError) as e:
        parse_allocation("ram=64G", REPORT, CURRENT)

    assert str(e.value) == "ram=64 GiB is more than this worker has (15.5 GiB total)"


def test_asking_for_more_disk_than_is_free_says_how_much_is_free():
    with pytest.raises(AllocationError, match=r"disk=200 GiB is more than .* \(100 GiB free\)"):
        parse_allocation("disk=200G", REPORT, CURRENT)


def test_unknown_allocation_fields_are_named():
    with pytest.raises(AllocationError, match="unknown allocation field.*gpu, vram"):
        parse_allocation("cpu=50% gpu=1 vram=2G", REPORT, CURRENT)


@pytest.mark.parametrize("text, match", [
    ("", "at least one"), ("   ", "at least one"), ("cpu", "not key=value"), ("ram=", "not key=value"),
    ("cpu=50% cpu=60%", "twice"), ("cpu=200%", "percentage"), ("ram=lots", "ram='lots' is not a size"),
])
def test_malformed_allocation_text_is_refused_with_a_reason(text, match):
    with pytest.raises(AllocationError, match=match):
        parse_allocation(text, REPORT, CURRENT)


def test_an_allocation_cannot_be_checked_before_the_worker_reports_resources():
    with pytest.raises(AllocationError, match="has not reported ram_total"):
        parse_allocation("cpu=50%", {"cpu_count": 4}, CURRENT)


def test_allocation_errors_are_value_errors():
    assert issubclass(AllocationError, ValueError)


def test_default_allocation_is_half_the_cpu_half_the_ram_a_quarter_of_free_disk():
    a = default_allocation(REPORT)

    assert a == Allocation(cpu_share=0.5, ram_bytes=REPORT["ram_total"] // 2, disk_bytes=25 * GiB)
    a.validate(REPORT)


def test_default_allocation_fits_this_machine(tmp_path):
    snap = snapshot(tmp_path)

    default_allocation(snap).validate(snap)


def test_describe_reads_as_a_sentence_fragment():
    assert Allocation(0.5, 2 * GiB, 10 * GiB).describe() == "cpu 50%, ram 2 GiB, disk 10 GiB"


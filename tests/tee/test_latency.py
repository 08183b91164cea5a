"""The latency model: profiles are validated, and projections follow the documented formula."""

from __future__ import annotations

import json

import pytest

from veil.errors import ConfigError
from veil.tee.latency import DEFAULT_HARDWARE, SplitCounts, load_hardware, project


def test_default_profile_loads_with_a_source_for_every_number():
    hw = load_hardware(DEFAULT_HARDWARE)
    assert hw.accel_gflops > hw.tee_gflops and all(hw.sources.values())


@pytest.mark.parametrize("change, match", [
    (lambda d: d.pop("switch_us"), "exactly the keys"),
    (lambda d: d.update(tee_gflops=-1), "positive"),
    (lambda d: d["sources"].pop("link_gbs"), "no source"),
])
def test_bad_profiles_are_refused(tmp_path, change, match):
    d = json.loads(DEFAULT_HARDWARE.read_text())
    change(d)
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=match):
        load_hardware(path)
    path.write_text("{")
    with pytest.raises(ConfigError, match="unreadable"):
        load_hardware(path)


def test_projection_formula():
    hw = load_hardware(DEFAULT_HARDWARE)
    flops, wbytes = 1e12, 1e9
    accel = project(SplitCounts.accelerator_only(flops, wbytes), hw)["total_s"]
    tee = project(SplitCounts(flops, wbytes, 0, 0, 0, 0, 0, 0), hw)["total_s"]
    assert accel == pytest.approx(flops / (hw.accel_gflops * 1e9))          # compute-bound
    assert tee / accel == pytest.approx(hw.accel_gflops / hw.tee_gflops)
    # overlapping enclave work is hidden while shorter than the device's; crossings add up
    split = SplitCounts(flops, wbytes, flops, wbytes, 1e9, 0, 1e6, 100)
    p = project(split, hw)
    assert p["total_s"] == pytest.approx(accel + 1e6 / (hw.link_gbs * 1e9) + 100 * hw.switch_us * 1e-6)
    slow = project(SplitCounts(flops, wbytes, flops, wbytes, 1e12, 0, 0, 0), hw)
    assert slow["total_s"] == pytest.approx(1e12 / (hw.tee_gflops * 1e9))
    assert split.enclave_share == pytest.approx(1e9 / (1e9 + flops))
    # the enclave's online AES work (LoRO's pad store) is on the critical path
    sealed = project(SplitCounts(flops, wbytes, flops, wbytes, 1e9, 0, 1e6, 100, 2e6), hw)
    assert sealed["total_s"] - p["total_s"] == pytest.approx(2e6 / (hw.tee_aes_gbs * 1e9))
    # products opened while the device multiplies are hidden like the overlapping FLOPs, until
    # they outlast the device
    ahead = project(SplitCounts(flops, wbytes, flops, wbytes, 1e9, 0, 1e6, 100, 0, 2e6), hw)
    assert ahead["total_s"] == pytest.approx(p["total_s"])
    lots = 10 * accel * hw.tee_aes_gbs * 1e9
    late = project(SplitCounts(flops, wbytes, flops, wbytes, 0, 0, 1e6, 100, 0, lots), hw)
    assert late["total_s"] == pytest.approx(lots / (hw.tee_aes_gbs * 1e9) + p["total_s"] - accel)

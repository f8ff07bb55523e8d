"""VM rung, kernel section: at the end of boot 1 (tests/guest_kernel.py) the guest's
socket-activated API takes /1.0/system/kernel: systemd-sysctl sets every sysctl the file
has on a real kernel (a VM has no container's limits), and zram-generator's config makes
a real /dev/zram0 swap, resized by a second PUT, turned off and reset when the size
goes, started again from a reset device; restarting the configure step changes nothing.
"""

from __future__ import annotations

from typing import Any

import pytest

import appliance
import vm

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def kernel(secure_boot: vm.Result) -> dict[str, Any]:
    part: dict[str, Any] = secure_boot.result["kernel"]
    return part


def _sysctl_file(text: str) -> dict[str, str]:
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    return {k.strip(): v.strip() for k, v in (line.split("=", 1) for line in lines)}


def _swap(swaps: str) -> list[str]:
    """/proc/swaps' zram0 line: name, type, size (KiB), used, priority."""
    lines = [line.split() for line in swaps.splitlines() if line.startswith("/dev/zram0 ")]
    assert len(lines) == 1, swaps
    return lines[0]


def test_every_sysctl_is_set_on_a_real_kernel(kernel: dict[str, Any]) -> None:
    assert kernel["put"]["status"] == 200, (kernel["put"], kernel["journal"])
    assert kernel["put_again"]["status"] == 200, kernel["put_again"]
    for step, algorithm in (("first", "reno"), ("second", "cubic")):
        wanted = _sysctl_file(kernel[step]["files"]["sysctl"])
        assert wanted["net.ipv4.tcp_congestion_control"] == algorithm
        assert wanted["net.core.default_qdisc"] == "fq"
        assert kernel[step]["sysctl"] == wanted, (step, kernel["sysctl_journal"])
    cat = kernel["first"]["cat_config"]["sysctl"]
    assert cat["rc"] == 0 and "# /etc/sysctl.d/99-local-sysctl.conf" in cat["out"], cat


def test_zram_swap_follows_the_document(kernel: dict[str, Any]) -> None:
    """96 MiB, then 128 MiB: zram0 has that size, zstd, and is swap at priority 100; GET
    shows the device's size; no size: swap off, device reset; then 128 MiB again."""
    sizes = appliance.KERNEL["zram_bytes"]
    assert kernel["swap_after_s"] is not None, (kernel["first"]["zram"], kernel["journal"])
    for step, size in (("first", sizes[0]), ("second", sizes[1])):
        zram = kernel[step]["zram"]
        assert zram["disksize"] == str(size), zram
        assert "[zstd]" in zram["comp_algorithm"], zram
        line = _swap(zram["swaps"])
        assert line[1] == "partition" and line[4] == "100", line
        assert int(line[2]) * 1024 <= size, line
        conf = kernel[step]["files"]["zram"]
        assert f"zram-size = {size >> 20}" in conf, conf
        cat = kernel[step]["cat_config"]["zram"]
        assert cat["rc"] == 0 and "# /etc/systemd/zram-generator.conf" in cat["out"], cat
        state = kernel[step]["get"]["body"]["metadata"]["state"]["memory"]["zram_swap"]
        assert state["disk_size"] == size, state
    assert kernel["resized_after_s"] is not None, kernel["second"]["zram"]
    assert kernel["put_no_zram"]["status"] == 200, kernel["put_no_zram"]
    assert kernel["swap_off_after_s"] is not None, kernel["no_zram"]["zram"]
    assert kernel["no_zram"]["files"]["zram"] is None
    assert kernel["no_zram"]["zram"].get("disksize", "0") == "0", (
        kernel["no_zram"]["zram"],
        kernel["no_zram_journal"],
        kernel.get("no_zram_holders"),
    )
    assert kernel["put_zram_again"]["status"] == 200, kernel["put_zram_again"]
    assert kernel["swap_again_after_s"] is not None, (kernel["zram_again"], kernel["zram_journal"])
    assert kernel["zram_again"]["disksize"] == str(sizes[1])


def test_a_restarted_configure_step_changes_nothing(kernel: dict[str, Any]) -> None:
    assert kernel["configure_restart"]["rc"] == 0, kernel["configure_restart"]
    assert kernel["sysctl_restart"]["rc"] == 0, kernel["sysctl_restart"]
    for later in ("after_configure", "after_sysctl"):
        assert kernel[later]["hashes"] == kernel["second"]["hashes"], later
        assert kernel[later]["sysctl"] == kernel["second"]["sysctl"], later
        assert kernel[later]["zram"]["disksize"] == kernel["second"]["zram"]["disksize"]
        assert _swap(kernel[later]["zram"]["swaps"])[4] == "100"


def test_systemd_analyze_verify_passes_the_units_that_read_the_files(
    kernel: dict[str, Any],
) -> None:
    verify = kernel["verify"]
    assert verify["rc"] == 0, verify

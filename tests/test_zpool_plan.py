"""The storage planner (render/zpool.py): IncusOS's positional rules as a table of
(pools now, pools asked for) -> commands, and the refusals, each naming its field."""

# ruff: noqa: E501 (tables of commands read best one case a line)
from __future__ import annotations

from typing import Any

import pytest

from incusos_hal.config import from_dict
from incusos_hal.hal.zfs import Layout
from incusos_hal.render.zpool import Drive, Machine, plan

D = "/dev/disk/by-id/scsi-disk"
ROOT = "/dev/disk/by-id/scsi-root"


def d(n: int) -> str:
    return f"{D}{n}"


def layout(
    type: str = "zfs-raid0",
    devices: tuple[str, ...] = (),
    degraded: tuple[str, ...] = (),
    log: tuple[str, ...] = (),
) -> Layout:
    return Layout(type, tuple(sorted(devices)), degraded, log, (), (), (), "", (), (), 0, 0, 0)


def machine(
    pools: dict[str, Layout] | None = None,
    sizes: dict[int, int] | None = None,
    gone: tuple[str, ...] = (),
) -> Machine:
    pools = pools or {}
    member = {dev: name for name, lay in pools.items() for dev in lay.members()}
    drives = {
        d(i): Drive(d(i), (sizes or {}).get(i, 10), member_pool=member.get(d(i), ""))
        for i in range(1, 8)
    }
    drives[ROOT] = Drive(ROOT, 50, boot=True, member_pool="local")
    resolve = {d(i): d(i) for i in range(1, 8)} | {
        f"/dev/sd{'abcdefg'[i - 1]}": d(i) for i in range(1, 8)
    }
    resolve[ROOT] = ROOT
    resolve[ROOT + "-part11"] = ROOT + "-part11"
    present = frozenset(resolve.values()) - set(gone)
    return Machine(
        pools,
        drives,
        resolve,
        present,
        frozenset(pools),
        ROOT + "-part11",
        {k: v.size for k, v in drives.items()},
    )


def pools(*docs: dict[str, Any]) -> Any:
    return from_dict({"storage": {"pools": list(docs)}}).storage.pools


def run(steps: Any) -> list[str]:
    return [" ".join(s.argv) if s.kind == "run" else f"{s.kind} {s.target}" for s in steps]


def key(name: str) -> str:
    return f"/state/zpool.{name}.key"


CASES = [
    (
        "create raid1 with a mirrored log",
        {},
        {"name": "p", "type": "zfs-raid1", "devices": ["/dev/sda", d(2)], "log": [d(3), d(4)]},
        ["new-key p",
         f"zpool create -o ashift=12 -O mountpoint=none -O encryption=aes-256-gcm -O keyformat=raw -O keylocation=file:///state/zpool.p.key p mirror {d(1)} {d(2)} log mirror {d(3)} {d(4)}"],
    ),
    (
        "create raid0 with special small blocks",
        {},
        {"name": "p", "type": "zfs-raid0", "devices": [d(1)], "special": {"type": "zfs-raid0", "special_small_blocks_size_in_kb": 16, "devices": [d(2)]}},
        ["new-key p",
         f"zpool create -o ashift=12 -O mountpoint=none -O encryption=aes-256-gcm -O keyformat=raw -O keylocation=file:///state/zpool.p.key p {d(1)} special {d(2)}",
         "zfs set special_small_blocks=16K p"],
    ),
    (
        "an empty entry takes a mirror's device offline",
        {"p": layout("zfs-raid1", (d(1), d(2), d(3)))},
        {"name": "p", "type": "zfs-raid1", "devices": ["", d(2), d(3)]},
        [f"zpool offline p {d(1)}"],
    ),
    (
        "an empty entry removes a raid0 device and wipes it last",
        {"p": layout("zfs-raid0", (d(1), d(2)))},
        {"name": "p", "type": "zfs-raid0", "devices": [d(1), ""]},
        [f"zpool remove p {d(2)}", f"wipe {d(2)}"],
    ),
    (
        "an offlined device listed again comes back online",
        {"p": layout("zfs-raid1", (d(2), d(3)), degraded=(d(1),))},
        {"name": "p", "type": "zfs-raid1", "devices": [d(2), d(3), d(1)]},
        [f"zpool online p {d(1)}"],
    ),
    (
        "a new device replaces the old one, which is wiped",
        {"p": layout("zfs-raid1", (d(1), d(2), d(3)))},
        {"name": "p", "type": "zfs-raid1", "devices": [d(1), d(2), d(4)]},
        [f"zpool replace p {d(3)} {d(4)}", f"wipe {d(3)}"],
    ),
    (
        "raid0 grows by add",
        {"p": layout("zfs-raid0", (d(1),))},
        {"name": "p", "type": "zfs-raid0", "devices": [d(1), d(2), d(3), d(4)]},
        [f"zpool add p {d(2)} {d(3)} {d(4)}"],
    ),
    (
        "raid0 to raid1 with two devices",
        {"p": layout("zfs-raid0", (d(1),))},
        {"name": "p", "type": "zfs-raid1", "devices": [d(1), d(2)]},
        [f"zpool attach p {d(1)} {d(2)}"],
    ),
    (
        "raid10 grows by a pair",
        {"p": layout("zfs-raid10", (d(1), d(2), d(3), d(4)))},
        {"name": "p", "type": "zfs-raid10", "devices": [d(1), d(2), d(3), d(4), d(5), d(6)]},
        [f"zpool attach p {d(1)} {d(5)}", f"zpool attach p {d(4)} {d(6)}"],
    ),
    (
        "raidz grows by one",
        {"p": layout("zfs-raidz1", (d(1), d(2), d(3)))},
        {"name": "p", "type": "zfs-raidz1", "devices": [d(1), d(2), d(3), d(4)]},
        [f"zpool attach p raidz1-0 {d(4)}"],
    ),
    (
        "the same document again does nothing",
        {"p": layout("zfs-raid1", (d(1), d(2)))},
        {"name": "p", "type": "zfs-raid1", "devices": [d(1), d(2)]},
        [],
    ),
]  # fmt: skip


@pytest.mark.parametrize(("title", "now", "asked", "expected"), CASES, ids=[c[0] for c in CASES])
def test_plans(
    title: str, now: dict[str, Layout], asked: dict[str, Any], expected: list[str]
) -> None:
    got = plan(pools(asked), machine(now), key)
    assert got.errors == ()
    assert run(got.steps) == expected


def test_a_physically_gone_degraded_device_is_replaced_by_the_extra_one() -> None:
    now = {"p": layout("zfs-raid1", (d(1),), degraded=(d(2),))}
    asked = pools({"name": "p", "type": "zfs-raid1", "devices": [d(1), d(3)]})
    assert run(plan(asked, machine(now, gone=(d(2),)), key).steps) == [
        f"zpool replace p {d(2)} {d(3)}"
    ]
    # Still there (only offline): the extra device is an expansion, as on IncusOS.
    assert run(plan(asked, machine(now), key).steps) == [f"zpool attach p {d(1)} {d(3)}"]


def test_every_run_step_but_raidz_expansion_and_raid0_remove_can_be_undone() -> None:
    got = plan(pools({"name": "p", "type": "zfs-raid1", "devices": [d(1), d(2)]}), machine(), key)
    create = next(s for s in got.steps if s.kind == "run")
    assert create.undo == ("zpool", "destroy", "p")
    got = plan(
        pools({"name": "p", "type": "zfs-raid1", "devices": [d(1), d(2), d(4)]}),
        machine({"p": layout("zfs-raid1", (d(1), d(2), d(3)))}),
        key,
    )
    assert got.steps[0].undo == ("zpool", "replace", "p", d(4), d(3))


REFUSALS = [
    ("shorter list", {"p": layout("zfs-raid1", (d(1), d(2)))}, {"name": "p", "type": "zfs-raid1", "devices": [d(1)]},
     "storage.pools[0].devices: only 1 devices provided in update, expected at least 2"),
    ("missing device", {}, {"name": "p", "type": "zfs-raid0", "devices": ["/dev/sdz"]},
     "storage.pools[0].devices[0]: device /dev/sdz does not exist"),
    ("boot disk", {}, {"name": "p", "type": "zfs-raid0", "devices": [ROOT]},
     f"storage.pools[0].devices[0]: list of devices includes the system root drive {ROOT}, which can't be used in other zpools"),
    ("another pool's member", {"q": layout("zfs-raid0", (d(1),))}, {"name": "p", "type": "zfs-raid0", "devices": [d(1)]},
     f"storage.pools[0].devices[0]: device {d(1)} is already a member of pool 'q'"),
    ("duplicate by two names", {}, {"name": "p", "type": "zfs-raid1", "devices": ["/dev/sda", d(1)]},
     "storage.pools[0].devices[1]: device /dev/disk/by-id/scsi-disk1 is already used by storage.pools[0].devices[0]"),
    ("mixed sizes", {}, {"name": "p", "type": "zfs-raidz1", "devices": [d(1), d(2), d(7)]},
     "storage.pools[0].devices: refusing to create new zpool with devices of different sizes unless AllowMixedDevSizes is true"),
    ("raid1 of one", {}, {"name": "p", "type": "zfs-raid1", "devices": [d(1)]},
     "storage.pools[0].devices: at least two devices must be specified when creating a raid1 pool"),
    ("mirror grows by two", {"p": layout("zfs-raid1", (d(1), d(2)))}, {"name": "p", "type": "zfs-raid1", "devices": [d(1), d(2), d(3), d(4)]},
     "storage.pools[0].devices[2]: expanding a pool can only be performed one device at a time, due to a required resilver between expansions"),
    ("raid10 grows by one", {"p": layout("zfs-raid10", (d(1), d(2), d(3), d(4)))}, {"name": "p", "type": "zfs-raid10", "devices": [d(1), d(2), d(3), d(4), d(5)]},
     "storage.pools[0].devices[4]: expanding a raid10 pool requires a pair of new devices"),
    ("type change", {"p": layout("zfs-raid1", (d(1), d(2)))}, {"name": "p", "type": "zfs-raidz1", "devices": [d(1), d(2)]},
     "storage.pools[0].type: pool 'p' is zfs-raid1: its type cannot change (only zfs-raid0 to zfs-raid1)"),
    ("local without its partition", {"local": layout("zfs-raid0", (ROOT + "-part11",))}, {"name": "local", "type": "zfs-raid0", "devices": [d(1), ""]},
     f"storage.pools[0].devices: special zpool 'local' must always include main system partition '{ROOT}-part11'"),
    ("local of three", {"local": layout("zfs-raid1", (ROOT + "-part11", d(1) + "-part11"))}, {"name": "local", "type": "zfs-raid1", "devices": [d(1) + "-part11", ROOT + "-part11", d(2)]},
     "storage.pools[0].devices: special zpool 'local' cannot consist of more than two devices"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("title", "now", "asked", "message"), REFUSALS, ids=[r[0] for r in REFUSALS]
)
def test_refusals_name_the_field_and_plan_nothing(
    title: str, now: dict[str, Layout], asked: dict[str, Any], message: str
) -> None:
    m = machine(now, sizes={7: 11})
    got = plan(pools(asked), m, key)
    assert got.steps == ()
    assert message in [str(e) for e in got.errors]


def test_mixed_sizes_allowed_forces() -> None:
    asked = {
        "name": "p",
        "type": "zfs-raidz1",
        "devices": [d(1), d(2), d(7)],
        "allow_mixed_dev_sizes": True,
    }
    got = plan(pools(asked), machine(sizes={7: 11}), key)
    assert got.errors == () and got.steps[1].argv[:3] == ("zpool", "create", "-f")


def test_local_raid1_partitions_the_second_disk() -> None:
    now = {"local": layout("zfs-raid0", (ROOT + "-part11",))}
    got = plan(
        pools({"name": "local", "type": "zfs-raid1", "devices": [ROOT + "-part11", d(1)]}),
        machine(now),
        key,
    )
    assert run(got.steps) == [
        f"partition-local {d(1)}",
        f"zpool attach local {ROOT}-part11 {d(1)}-part11",
    ]

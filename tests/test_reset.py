"""The factory reset's edges on real things: TPM2_Clear on swtpm (what was sealed before
does not load after), the first-boot partitions deleted from a loop device laid out as
the image is (everything else byte for byte as it was), and apply.reset's order on both:
a TPM that refuses the clear erases nothing, a disk that is not an appliance's is not
touched, a service off the running system touches neither."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from incusos_hal.apply.reset import (
    Machine,
    ResetRefused,
    ResetRequest,
    factory_reset,
    plan_partitions,
)
from incusos_hal.hal import disk as disks
from incusos_hal.hal import repart, tpm

from conftest import force_tpm_fallback, require_root, require_tool

MIB = 1 << 20
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
USR = "8484680C-9521-48C6-9C11-B0720656F69E"
USR_VERITY = "77FF5F63-E7B6-4633-ACF4-1565B864C0E6"
USR_VERITY_SIG = "E7BB33FB-06CF-4E81-8273-E543B413E2E2"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
SWAP = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"
ROOT = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
# As an installed IncusOS disk: the image's partitions (A and B /usr), then what
# systemd-repart made on the first boot (swap and root unlabelled in the GPT name sense
# here: systemd-repart names them "swap" and "root-x86-64", which selection ignores).
APPLIANCE = (
    (ESP, "esp"),
    (LINUX, "seed-data"),
    (USR_VERITY_SIG, "IncusOS_1_verity_sig"),
    (USR_VERITY_SIG, "_empty"),
    (USR_VERITY, "IncusOS_1_verity"),
    (USR_VERITY, "_empty"),
    (USR, "IncusOS_1"),
    (USR, "_empty"),
    (SWAP, "swap"),
    (ROOT, "root-x86-64"),
    (LINUX, "local-data"),
)
SEED = {"update": {"channel": "testing", "check_frequency": "12h"}}


# -- the TPM ----------------------------------------------------------------------------------


def _seal(tcti: str) -> tpm.Sealed:
    with tpm.open_tpm(tcti) as t:
        sealed = t.seal(b"a volume key", t.current_policy("sha256", [7]))
        assert t.unseal_sealed(sealed) == b"a volume key"
        t.identity_public_key_pem()  # a second persistent object
    return sealed


def _persistent_handles(tcti: str) -> list[int]:
    with tpm.open_tpm(tcti) as t:
        tss = t.tss
        _, data = t.esapi.get_capability(tss.TPM2_CAP.HANDLES, 0x81000000, 64)
        return [int(h) for h in data.data.handles]


def _loads(tcti: str, sealed: tpm.Sealed) -> bool:
    with tpm.open_tpm(tcti) as t:
        try:
            return t.unseal_sealed(sealed) == b"a volume key"
        except tpm.TPMError:
            return False


def _set_lockout_auth(tcti: str) -> None:
    with tpm.open_tpm(tcti) as t:
        t.esapi.hierarchy_change_auth(t.tss.ESYS_TR.LOCKOUT, b"the owner's lockout secret")


@pytest.fixture(params=["wire", "pytss"])
def both_paths(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The clear on the fast path's TCTI and on tpm2-pytss's own (hal.tpm's two paths)."""
    if request.param == "pytss":
        force_tpm_fallback(monkeypatch)


@pytest.mark.usefixtures("both_paths")
def test_clear_forgets_what_was_sealed_and_persisted(swtpm: str) -> None:
    sealed = _seal(swtpm)
    assert tpm.SRK_HANDLE in _persistent_handles(swtpm)
    with tpm.open_tpm(swtpm) as t:
        t.clear()
    assert _persistent_handles(swtpm) == []
    assert not _loads(swtpm, sealed)
    # The cleared TPM works: a new SRK, a new seal.
    assert _loads(swtpm, _seal(swtpm)) is True


@pytest.mark.usefixtures("both_paths")
def test_clear_refused_when_the_lockout_auth_is_set(swtpm: str) -> None:
    sealed = _seal(swtpm)
    _set_lockout_auth(swtpm)
    with tpm.open_tpm(swtpm) as t, pytest.raises(tpm.TPMError, match="TPM clear"):
        t.clear()
    assert tpm.SRK_HANDLE in _persistent_handles(swtpm)
    assert _loads(swtpm, sealed)


# -- first-boot partitions, in a table -------------------------------------------------------


def _table(*rows: tuple[str, str]) -> disks.Table:
    entries = tuple(
        disks.Entry(i + 1, uuid.UUID(t), uuid.uuid4(), 2048 * (i + 1), 2048 * (i + 1) + 2047, 0, n)
        for i, (t, n) in enumerate(rows)
    )
    return disks.Table(512, uuid.uuid4(), 34, 1 << 20, 128, 128, entries)


def test_a_partition_is_found_by_its_number_in_the_disks_sysfs(tmp_path: Path) -> None:
    # The shape of /sys/class/block/<disk>/<partition>/partition on Linux; a partition
    # the kernel knows but udev made no node for is not handed out.
    block = tmp_path / "sys/class/block/loop7"
    for child, number in (("loop7p1", "1"), ("loop7p3", "3"), ("queue", None)):
        (block / child).mkdir(parents=True)
        if number is not None:
            (block / child / "partition").write_text(f"{number}\n")
    (tmp_path / "dev").mkdir()
    for node in ("loop7", "loop7p3"):
        (tmp_path / "dev" / node).write_bytes(b"")
    disk = tmp_path / "dev/loop7"
    assert disks.partition_node(tmp_path, disk, 3) == tmp_path / "dev/loop7p3"
    assert disks.partition_node(tmp_path, disk, 1) is None
    assert disks.partition_node(tmp_path, disk, 2) is None
    assert disks.partition_node(tmp_path, tmp_path / "dev/sdz", 3) is None


def test_first_boot_partitions_by_type_and_label() -> None:
    found = repart.first_boot_partitions(_table(*APPLIANCE))
    assert [(f.kind, f.entry.index) for f in found] == [
        ("swap", 9),
        ("root", 10),
        ("local-data", 11),
    ]
    # Moved around and renamed (systemd-repart's default names or none): the same three.
    shuffled = (
        (LINUX, "local-data"),
        (ROOT, ""),
        *APPLIANCE[:8],
        (SWAP, ""),
    )
    found = repart.first_boot_partitions(_table(*shuffled))
    assert [(f.kind, f.entry.index) for f in found] == [
        ("local-data", 1),
        ("root", 2),
        ("swap", 11),
    ]


@pytest.mark.parametrize(
    ("rows", "why"),
    [
        (APPLIANCE[:8], "has no root, swap or local-data partition"),
        (((LINUX, "data"), (ROOT, ""), (SWAP, "")), "has no EFI system partition and /usr"),
        ((*APPLIANCE, (ROOT, "root-x86-64")), "has 2 root partitions (10, 12)"),
        # The image's partitions are never picked, whatever their label: a /usr or a
        # seed-data partition labelled local-data is not local-data.
        (((ESP, "esp"), (USR, "local-data"), (LINUX, "seed-data")), "no root, swap"),
    ],
)
def test_not_an_appliance_layout_is_refused(rows: tuple[tuple[str, str], ...], why: str) -> None:
    with pytest.raises(repart.LayoutError, match=re.escape(why)):
        repart.first_boot_partitions(_table(*rows), "the disk")


# -- on a loop device -----------------------------------------------------------------------


@dataclass
class LoopDisk:
    image: Path
    node: Path

    def dump(self) -> list[str]:
        out = subprocess.run(
            ["sfdisk", "--dump", str(self.node)], capture_output=True, text=True, check=True
        ).stdout
        return out.splitlines()

    def contents(self) -> dict[str, str]:
        """Each partition's bytes (SHA-256, read from the image file), by unique GUID."""
        data = self.image.read_bytes()
        table = disks.read_gpt(self.image)
        return {
            str(e.unique): hashlib.sha256(data[e.first * 512 : (e.last + 1) * 512]).hexdigest()
            for e in table.entries
        }

    def kernel_partitions(self) -> list[str]:
        block = Path("/sys/block", self.node.name)
        return sorted(p.name for p in block.iterdir() if p.name.startswith(self.node.name))


def _make_disk(tmp_path: Path, rows: tuple[tuple[str, str], ...]) -> Iterator[LoopDisk]:
    require_root()
    require_tool("losetup", "sfdisk", "partx")
    image = tmp_path / "disk.img"
    size = (len(rows) * 2 + 2) * MIB
    with open(image, "wb") as f:
        f.truncate(size)
    layout = "label: gpt\n" + "".join(
        f"size=2MiB, type={t}, name={n}\n" if n else f"size=2MiB, type={t}\n" for t, n in rows
    )
    subprocess.run(["sfdisk", "-q", str(image)], input=layout.encode(), check=True)
    # Every partition holds its own bytes, so a changed byte anywhere shows.
    with open(image, "r+b") as f:
        for e in disks.read_gpt(image).entries:
            f.seek(e.first * 512)
            f.write(hashlib.sha256(str(e.unique).encode()).digest() * (e.sectors * 512 // 32))
    node = Path(
        subprocess.run(
            ["losetup", "-f", "--show", str(image)], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    try:
        subprocess.run(["partx", "-a", str(node)], check=True)
        yield LoopDisk(image, node)
    finally:
        subprocess.run(["partx", "-d", str(node)], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", str(node)], check=False)


@pytest.fixture
def appliance_disk(tmp_path: Path) -> Iterator[LoopDisk]:
    yield from _make_disk(tmp_path, APPLIANCE)


@pytest.fixture
def plain_disk(tmp_path: Path) -> Iterator[LoopDisk]:
    """A data disk: a root and a swap partition, no ESP or /usr: no appliance's."""
    yield from _make_disk(tmp_path, ((LINUX, "data"), (ROOT, ""), (SWAP, ""), (LINUX, "x")))


@pytest.fixture
def reset_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    """(state dir, seed file, an empty root for the seed's machine checks)."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "config.toml").write_bytes(b"version = 1\n")
    (state / "keys").mkdir()
    (state / "keys/server.key").write_bytes(b"not a real key")
    seed = tmp_path / "seed.tar"
    from incusos_hal.hal import seed as media

    seed.write_bytes(media.tar_bytes({"network.json": b'{"dns": {"hostname": "old"}}'}))
    monkeypatch.setenv("INCUSOS_HAL_SEED", str(seed))
    root = tmp_path / "root"
    root.mkdir()
    return state, seed, root


def _without(dump: list[str], node: Path, *numbers: int) -> list[str]:
    """An sfdisk --dump less the lines of partitions `numbers`."""
    names = {f"{node}p{n}" for n in numbers}
    return [line for line in dump if line.split(":")[0].strip() not in names]


def _tree(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(directory.rglob("*"))
    }


@pytest.mark.root
def test_delete_takes_exactly_the_first_boot_partitions(appliance_disk: LoopDisk) -> None:
    d = appliance_disk
    dump, contents = d.dump(), d.contents()
    assert len(d.kernel_partitions()) == 11
    found = repart.first_boot_partitions(disks.read_gpt(d.node))
    assert repart.delete(d.node, found) == []
    after = d.dump()
    assert after == _without(dump, d.node, 9, 10, 11)
    assert len(after) == len(dump) - 3
    kept = {e.unique for e in disks.read_gpt(d.node).entries}
    assert len(kept) == 8
    assert {k: v for k, v in contents.items() if uuid.UUID(k) in kept} == d.contents()
    assert d.kernel_partitions() == [f"{d.node.name}p{n}" for n in range(1, 9)]


@pytest.mark.root
def test_delete_refuses_a_table_changed_since_it_was_read(appliance_disk: LoopDisk) -> None:
    d = appliance_disk
    found = repart.first_boot_partitions(disks.read_gpt(d.node))
    subprocess.run(
        ["sfdisk", "-q", "--no-reread", "--part-label", str(d.node), "10", "renamed"], check=True
    )
    dump = d.dump()
    with pytest.raises(disks.DiskError, match=r"partition 10 .* changed since it was read"):
        repart.delete(d.node, found)
    assert d.dump() == dump


@pytest.mark.root
def test_factory_reset_clears_the_tpm_and_deletes_the_first_boot_partitions(
    appliance_disk: LoopDisk, swtpm: str, reset_env: tuple[Path, Path, Path]
) -> None:
    state, seed, root = reset_env
    d = appliance_disk
    sealed = _seal(swtpm)
    dump, contents = d.dump(), d.contents()
    log: list[str] = []
    done = factory_reset(
        state,
        str(root),
        ResetRequest(seeds=SEED),
        lambda level, message: log.append(message),
        Machine(live=True, tcti=swtpm, disk=d.node),
    )
    assert done.tpm_cleared and not done.left_alone
    assert done.deleted == (
        "swap (partition 9)",
        "root (partition 10)",
        "local-data (partition 11)",
    )
    assert not _loads(swtpm, sealed) and _persistent_handles(swtpm) == []
    assert d.dump() == _without(dump, d.node, 9, 10, 11)
    kept = {e.unique for e in disks.read_gpt(d.node).entries}
    assert {k: v for k, v in contents.items() if uuid.UUID(k) in kept} == d.contents()
    assert list(state.iterdir()) == []
    from incusos_hal.hal import seed as media

    written = media.read(seed)
    assert sorted(written) == ["network.json", "update.json"]
    assert json.loads(written["update.json"]) == SEED["update"]
    assert any("TPM cleared; deleted swap (partition 9)" in line for line in log), log


@pytest.mark.root
@pytest.mark.parametrize("allow", [False, True])
def test_a_tpm_that_refuses_the_clear(
    appliance_disk: LoopDisk, swtpm: str, reset_env: tuple[Path, Path, Path], allow: bool
) -> None:
    """Not allowed: 500, nothing erased, the seed as it was. Allowed: the reset goes on
    without it, as IncusOS's allow_tpm_reset_failure."""
    state, seed, root = reset_env
    d = appliance_disk
    sealed = _seal(swtpm)
    _set_lockout_auth(swtpm)
    dump, contents, tree, seed_bytes = d.dump(), d.contents(), _tree(state), seed.read_bytes()
    request = ResetRequest(allow_tpm_reset_failure=allow, seeds=SEED)
    machine = Machine(live=True, tcti=swtpm, disk=d.node)
    if not allow:
        with pytest.raises(ResetRefused) as e:
            factory_reset(state, str(root), request, machine=machine)
        assert e.value.status == 500
        assert "TPM clear" in str(e.value) and "nothing was erased" in str(e.value)
        assert (d.dump(), d.contents(), _tree(state)) == (dump, contents, tree)
        assert seed.read_bytes() == seed_bytes
    else:
        done = factory_reset(state, str(root), request, machine=machine)
        assert not done.tpm_cleared and len(done.deleted) == 3
        assert len(disks.read_gpt(d.node).entries) == 8
        assert list(state.iterdir()) == []
    assert _loads(swtpm, sealed)


@pytest.mark.root
def test_a_refused_reset_puts_back_the_whole_seed_head_it_zeroed(
    appliance_disk: LoopDisk,
    swtpm: str,
    reset_env: tuple[Path, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reset the TPM refuses leaves the seed partition as it was: write_tar zeroes the
    whole head `read` looks at (HEAD_BYTES), so the undo must keep that much, not only
    the new tar's length (a small seed's tar is 10 KiB; an older seed ran past it)."""
    from incusos_hal.hal import seed as media

    state, _seed, root = reset_env
    d = appliance_disk
    node = Path(f"{d.node}p2")
    old = {"network.json": b'{"dns": {"hostname": "old"}}' + b" " * 30_000}
    with open(node, "r+b") as f:
        f.write(media.tar_bytes(old))
    monkeypatch.setenv("INCUSOS_HAL_SEED", str(node))
    _set_lockout_auth(swtpm)
    with open(node, "rb") as f:
        before = f.read(2 * media.HEAD_BYTES)
    request = ResetRequest(seeds=SEED, wipe_existing_seeds=True)
    with pytest.raises(ResetRefused, match="nothing was erased"):
        factory_reset(
            state, str(root), request, machine=Machine(live=True, tcti=swtpm, disk=d.node)
        )
    with open(node, "rb") as f:
        after = f.read(2 * media.HEAD_BYTES)
    changed = [i for i in range(len(before)) if before[i] != after[i]]
    assert changed == [], f"{len(changed)} bytes differ, from {changed[0]} to {changed[-1]}"
    assert media.read(node) == old


@pytest.mark.root
def test_a_disk_not_laid_out_as_an_appliance_is_left_alone(
    plain_disk: LoopDisk, swtpm: str, reset_env: tuple[Path, Path, Path]
) -> None:
    state, _seed, root = reset_env
    d = plain_disk
    sealed = _seal(swtpm)
    dump, contents = d.dump(), d.contents()
    log: list[str] = []
    done = factory_reset(
        state,
        str(root),
        ResetRequest(seeds=SEED),
        lambda level, message: log.append(message),
        Machine(live=True, tcti=swtpm, disk=d.node),
    )
    assert "has no EFI system partition and /usr partition" in done.left_alone
    assert not done.tpm_cleared and done.deleted == ()
    assert (d.dump(), d.contents()) == (dump, contents)
    assert _loads(swtpm, sealed)
    assert list(state.iterdir()) == []  # as before this change: the state dir alone
    assert any("not an appliance's layout" in line for line in log), log


@pytest.mark.root
def test_off_the_running_system_nothing_but_the_state_dir(
    appliance_disk: LoopDisk, swtpm: str, reset_env: tuple[Path, Path, Path]
) -> None:
    state, _seed, root = reset_env
    d = appliance_disk
    sealed = _seal(swtpm)
    dump, contents = d.dump(), d.contents()
    machine = Machine(live=False, tcti=swtpm, disk=d.node)
    assert plan_partitions(str(root), machine)[1] == ()
    done = factory_reset(state, str(root), ResetRequest(seeds=SEED), machine=machine)
    assert done.left_alone.startswith("not the running system")
    assert (d.dump(), d.contents()) == (dump, contents)
    assert _loads(swtpm, sealed)
    assert list(state.iterdir()) == []


@pytest.mark.root
def test_the_boot_disk_is_the_one_under_the_running_usr(
    appliance_disk: LoopDisk, tmp_path: Path
) -> None:
    """On the running system the disk is found as hal.disk finds the installer's source:
    /usr's device in mountinfo, followed down through sysfs (here the kernel's own entry
    for the loop disk's /usr partition, as partx added it)."""
    d = appliance_disk
    usr = Path("/sys/block", d.node.name, f"{d.node.name}p7")
    numbers = (usr / "dev").read_text().strip()
    root = tmp_path / "machine"
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/mountinfo").write_text(
        f"25 1 7:0 / / rw - ext4 /dev/x rw\n36 25 {numbers} / /usr ro - erofs /dev/dm-0 ro\n"
    )
    (root / "sys/dev/block").mkdir(parents=True)
    (root / "sys/dev/block" / numbers).symlink_to(usr)
    (root / "dev").mkdir()
    (root / "dev" / d.node.name).symlink_to(d.node)
    disk, found, why = plan_partitions(str(root), Machine(live=True))
    assert (disk, why) == (root / "dev" / d.node.name, "")
    assert [(f.kind, f.entry.index) for f in found] == [
        ("swap", 9),
        ("root", 10),
        ("local-data", 11),
    ]
    # No /usr mounted from a disk: nothing is planned, and the plan says why.
    (root / "proc/self/mountinfo").write_text("25 1 7:0 / / rw - ext4 /dev/x rw\n")
    assert plan_partitions(str(root), Machine(live=True)) == (
        None,
        (),
        "no disk under the running /usr: the TPM and the disks are left alone",
    )


@pytest.mark.root
def test_the_seed_goes_to_the_boot_disks_own_seed_partition(
    appliance_disk: LoopDisk, swtpm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another disk's `seed-data` partition (a second appliance disk, a stick labelled
    so) is neither read nor written: the seed the next boot reads is the boot disk's, as
    IncusOS writes its own disk's seed partition."""
    from incusos_hal.hal import seed as media

    monkeypatch.delenv("INCUSOS_HAL_SEED", raising=False)
    d = appliance_disk
    own = Path(f"{d.node}p2")
    with open(own, "r+b") as f:
        f.write(media.tar_bytes({"network.json": b'{"dns": {"hostname": "own"}}'}))
    root = tmp_path / "machine"
    block = root / "sys/class/block"
    block.mkdir(parents=True)
    (block / d.node.name).symlink_to(Path("/sys/class/block", d.node.name))
    (root / "dev").mkdir()
    (root / "dev" / own.name).symlink_to(own)
    # Another disk's seed-data partition, listed before nothing of the boot disk's.
    (block / "aaa2").mkdir()
    (block / "aaa2/uevent").write_text("DEVNAME=aaa2\nPARTNAME=seed-data\n")
    other = root / "dev/aaa2"
    other.write_bytes(media.tar_bytes({"network.json": b'{"dns": {"hostname": "other"}}'}))
    other_bytes = other.read_bytes()
    state = tmp_path / "state"
    state.mkdir()
    factory_reset(state, str(root), ResetRequest(seeds=SEED), machine=Machine(True, swtpm, d.node))
    assert other.read_bytes() == other_bytes
    written = media.read(own)
    assert sorted(written) == ["network.json", "update.json"]
    assert json.loads(written["network.json"]) == {"dns": {"hostname": "own"}}


@pytest.mark.root
def test_a_4k_sector_boot_disk_is_reset_too(
    tmp_path: Path, swtpm: str, reset_env: tuple[Path, Path, Path]
) -> None:
    """The installer writes to disks of 4096-byte logical sectors (NVMe formatted so):
    their GPT is at byte 4096, not 512. The reset reads it there, clears the TPM and
    deletes the first-boot partitions, rather than take the disk for a stranger's and
    leave the machine half reset (state gone, the old root kept)."""
    require_root()
    require_tool("losetup", "sfdisk", "partx")
    state, _seed, root = reset_env
    image = tmp_path / "disk4k.img"
    with open(image, "wb") as f:
        f.truncate(32 * MIB)
    node = Path(
        subprocess.run(
            ["losetup", "-f", "--show", "-b", "4096", str(image)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    try:
        layout = "label: gpt\n" + "".join(f"size=2MiB, type={t}, name={n}\n" for t, n in APPLIANCE)
        subprocess.run(["sfdisk", "-q", str(node)], input=layout.encode(), check=True)
        sealed = _seal(swtpm)
        done = factory_reset(
            state, str(root), ResetRequest(seeds=SEED), machine=Machine(True, swtpm, node)
        )
        assert done.left_alone == ""
        assert done.tpm_cleared and len(done.deleted) == 3
        assert not _loads(swtpm, sealed)
        dump = subprocess.run(
            ["sfdisk", "--dump", str(node)], capture_output=True, text=True, check=True
        ).stdout
        assert "sector-size: 4096" in dump
        assert [line.split(":")[0].strip() for line in dump.splitlines() if "start=" in line] == [
            f"{node}p{n}" for n in range(1, 9)
        ]
    finally:
        subprocess.run(["partx", "-d", str(node)], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", str(node)], check=False)

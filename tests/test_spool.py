"""The listener's spool, on real files: an instance is placed whole or not at all,
and what a crash leaves in the spool is put in place or removed at the next start.

A power failure cannot be staged here, so its outcomes are: the spool files exactly
as `commit` leaves them, with the final name removed when the test needs a link
that "did not reach the disk", then a new spool on the same folder."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from procs import mounted_tmpfs
from watcher.spool import AHEAD, PREFIX, XATTR, Spool

DATA = b"\0" * 128 + b"DICM" + bytes(range(256)) * 500


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    spool = Spool(tmp_path / "spool", tmp_path / "store")
    spool.start()
    yield spool
    spool.stop()


def write(spool: Spool, final: Path, data: bytes = DATA) -> os.stat_result:
    entry = spool.take()
    entry.write(data[:1000])
    entry.write(memoryview(data)[1000:])
    entry.write_back()
    return entry.commit(final)


def held(folder: Path) -> list[Path]:
    """Spool files with content (the empty ones are made ahead)."""
    return [p for p in folder.iterdir() if p.stat().st_size]


def final_path(tmp_path: Path, n: int = 1) -> Path:
    return tmp_path / "store" / "1.2.3" / "1.2.3.4" / f"1.2.3.4.{n}.dcm"


def test_an_instance_is_placed_whole_and_the_spool_settles(spool: Spool, tmp_path: Path) -> None:
    assert spool.linking  # this file system has extended attributes and hard links
    final = final_path(tmp_path)
    st = write(spool, final)
    assert final.read_bytes() == DATA and st.st_size == len(DATA)
    spool.stop()  # settles what is linked
    assert held(spool.folder) == [] and list(spool.folder.iterdir()) == []
    assert XATTR not in os.listxattr(final)  # only the spool needed it
    assert oct(final.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_a_synced_instance_leaves_the_page_cache(spool: Spool, tmp_path: Path) -> None:
    fincore = shutil.which("fincore")
    if fincore is None:
        pytest.skip("fincore is not installed (apt-get install util-linux-extra)")
    final = final_path(tmp_path)
    write(spool, final, DATA * 8)  # 1 MB
    resident = subprocess.run([fincore, "--bytes", "--noheadings", "--output", "RES",
                               str(final)], capture_output=True, text=True, check=True)
    assert int(resident.stdout) == 0


def test_files_are_made_ahead_and_made_on_demand_when_none_is_ready(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", tmp_path / "store")
    spool.open()  # ready files, and no thread to make more
    assert len(list(spool.folder.iterdir())) == AHEAD
    for n in range(AHEAD + 3):
        write(spool, final_path(tmp_path, n))
    assert all(final_path(tmp_path, n).read_bytes() == DATA for n in range(AHEAD + 3))
    spool.start()
    spool.stop()
    assert list(spool.folder.iterdir()) == []


def test_an_instance_sent_again_replaces_the_first(spool: Spool, tmp_path: Path) -> None:
    final = final_path(tmp_path)
    write(spool, final, DATA)
    write(spool, final, DATA[:-1] + b"!")
    assert final.read_bytes() == DATA[:-1] + b"!"
    spool.stop()
    assert list(spool.folder.iterdir()) == []


@pytest.mark.parametrize("linking", [True, False])
def test_a_folder_removed_while_running_is_made_again(
        spool: Spool, tmp_path: Path, linking: bool) -> None:
    spool.linking = linking
    write(spool, final_path(tmp_path, 1))
    spool.stop()  # settled: nothing of it is left in the spool
    shutil.rmtree(tmp_path / "store" / "1.2.3")  # someone tidies up the store
    spool.start()
    spool.linking = linking
    write(spool, final_path(tmp_path, 2))
    assert final_path(tmp_path, 2).read_bytes() == DATA


def test_without_links_each_instance_is_renamed_and_synced_before_its_answer(
        spool: Spool, tmp_path: Path) -> None:
    spool.linking = False  # as on a file system without xattrs or hard links
    final = final_path(tmp_path)
    write(spool, final)
    assert final.read_bytes() == DATA
    assert held(spool.folder) == []  # nothing left to settle, even before stop
    assert XATTR not in os.listxattr(final)


def test_a_link_lost_in_a_crash_is_made_again_at_the_next_start(tmp_path: Path) -> None:
    crashed = Spool(tmp_path / "spool", tmp_path / "store")
    crashed.open()  # no thread: nothing settles, as if the power failed now
    finals = [final_path(tmp_path, n) for n in range(3)]
    for final in finals:
        entry = crashed.take()
        entry.write(DATA + final.name.encode())
        entry.commit(final)
    finals[0].unlink()  # its link never reached the disk; the others did
    assert len(held(crashed.folder)) == 3

    restarted = Spool(tmp_path / "spool", tmp_path / "store")
    by_name = {final.name: final for final in finals}

    def final_of(spooled: Path) -> Path | None:
        return by_name[spooled.read_bytes()[len(DATA):].decode()]

    assert restarted.recover(final_of) == 1
    for final in finals:
        assert final.read_bytes() == DATA + final.name.encode()
    assert XATTR not in os.listxattr(finals[0])
    assert list(restarted.folder.iterdir()) == []


@pytest.mark.parametrize("damage", ["no attribute", "short", "changed", "bad attribute"])
def test_a_spool_file_not_whole_is_removed_at_the_next_start(tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "spool"
    folder.mkdir()
    path = folder / f"{PREFIX}0123456789abcdef"
    data = DATA[:-10] if damage == "short" else DATA
    if damage == "changed":
        data = DATA[:500] + b"X" + DATA[501:]
    path.write_bytes(data)
    if damage != "no attribute":
        value = b"12 zz" if damage == "bad attribute" else \
            f"{len(DATA)} {zlib.crc32(DATA):08x}".encode()
        os.setxattr(path, XATTR, value)
    (folder / f"{PREFIX}fedcba9876543210").touch()  # made ahead, never used
    (folder / "1.2.3.ab12cd34.part").write_bytes(DATA)  # an earlier version's temporary
    spool = Spool(folder, tmp_path / "store")
    assert spool.recover(lambda spooled: pytest.fail("nothing here is whole")) == 0
    assert list(folder.iterdir()) == []
    assert not (tmp_path / "store").exists()


def test_a_whole_spool_file_whose_name_cannot_be_read_is_kept(tmp_path: Path) -> None:
    crashed = Spool(tmp_path / "spool", tmp_path / "store")
    crashed.open()
    entry = crashed.take()
    entry.write(DATA)
    entry.commit(final_path(tmp_path))
    final_path(tmp_path).unlink()
    restarted = Spool(tmp_path / "spool", tmp_path / "store")
    assert restarted.recover(lambda spooled: None) == 0
    assert len(held(restarted.folder)) == 1  # not lost: left for someone to look at


def test_a_full_disk_fails_the_write_and_leaves_nothing(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "disk", "2m") as disk:
        spool = Spool(disk / "spool", disk / "store")
        spool.start()
        try:
            final = disk / "store" / "1" / "2" / "3.dcm"
            with pytest.raises(OSError) as failure:
                write(spool, final, DATA * 20)  # 5 MB on a 2 MB disk
            assert failure.value.errno == errno.ENOSPC
            assert not final.exists()
            assert held(spool.folder) == []
            write(spool, final)  # and the next one, that fits, goes through
            assert final.read_bytes() == DATA
        finally:
            spool.stop()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

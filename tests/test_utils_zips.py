"""The compact zip index photos are read through: every member as zipfile reads it, missing and damaged members
as the errors a data loader drops, zip64 and other compressions, and reads after fork."""

from __future__ import annotations

import multiprocessing
import zipfile

import pytest

from pillsnap.utils.images import read_bytes
from pillsnap.utils.zips import ZipIndex

MEMBERS = {"K-000001/a.png": b"\x89PNG" + bytes(range(256)) * 40, "K-000002/b.png": b"stored bytes",
           "라벨/한글.json": "{\"이름\": 1}".encode(), "K-000003/c.png": b"x" * 5000}


def _read_in_child(path: str, name: str, queue) -> None:
    queue.put(read_bytes(f"zip:{path}!{name}"))


def test_every_member_reads_as_zipfile_reads_it(tmp_path):
    path = tmp_path / "photos.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i, (name, data) in enumerate(MEMBERS.items()):
            zf.writestr(name, data, compress_type=(zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2)[i % 3])
    index = ZipIndex(str(path))
    assert len(index) == len(MEMBERS)
    for name, data in MEMBERS.items():
        assert index.read(name) == data
        assert read_bytes(f"zip:{path}!{name}") == data
    with pytest.raises(KeyError, match="K-000009"):
        index.read("K-000009/z.png")
    # read in a forked child through the parent's index (os.pread: no shared file offset to corrupt)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    name = "K-000001/a.png"
    child = ctx.Process(target=_read_in_child, args=(str(path), name, queue))
    child.start()
    assert queue.get(timeout=30) == MEMBERS[name] == read_bytes(f"zip:{path}!{name}")
    child.join(30)


def test_zip64_and_a_damaged_member(tmp_path):
    path = tmp_path / "big.zip"
    with zipfile.ZipFile(path, "w", allowZip64=True) as zf:
        for name, data in MEMBERS.items():
            with zf.open(name, "w", force_zip64=True) as fh:
                fh.write(data)
    index = ZipIndex(str(path))
    assert all(index.read(name) == data for name, data in MEMBERS.items())
    raw = bytearray(path.read_bytes())
    at = raw.find(b"stored bytes")
    raw[at:at + 6] = b"STORED"
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(zipfile.BadZipFile, match="CRC"):
        ZipIndex(str(damaged)).read("K-000002/b.png")


def test_a_zip_cut_short_after_indexing_gives_the_error_loaders_drop(tmp_path):
    """A member whose bytes are gone (a header past the end, a short read) is a damaged archive, never a
    struct.error that would kill a loader worker."""
    from pillsnap.utils.images import DECODE_ERRORS

    path = tmp_path / "photos.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in MEMBERS.items():
            zf.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED)
    index = ZipIndex(str(path))
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 3)
    errors = []
    for name in MEMBERS:
        try:
            index.read(name)
        except DECODE_ERRORS as err:
            errors.append(type(err))
    assert errors and set(errors) == {zipfile.BadZipFile}
    index.close()
    with pytest.raises(ValueError, match="closed"):
        index.read("K-000001/a.png")


def test_a_member_in_a_compression_zipfile_cannot_read_gives_the_error_loaders_drop(tmp_path):
    """Deflate64 (method 9: Windows' own zipper past 2 GB): zipfile raises NotImplementedError, which killed the
    loader worker instead of dropping the photo."""
    from pillsnap.utils.images import DECODE_ERRORS

    path = tmp_path / "photos.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("K-000002/b.png", b"stored bytes", compress_type=zipfile.ZIP_STORED)
    raw = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):  # the method in both headers
        at = raw.find(signature) + offset
        raw[at:at + 2] = (9).to_bytes(2, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(DECODE_ERRORS, match="method 9"):
        read_bytes(f"zip:{path}!K-000002/b.png")


def test_a_real_zip64_archive_is_read_by_our_own_parser_and_a_misflagged_name_costs_that_member(tmp_path,
                                                                                                  monkeypatch):
    """The 13-95 GB photo zips are zip64 (sizes, offsets and the end record past 32 bits). They went through
    zipfile's parser, which refuses the whole archive for one member name flagged UTF-8 that is not (a readme
    in cp949): a 95 GB zip of photos unreadable for its readme."""
    from pillsnap.utils.zips import read_central_directory

    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 8)  # what zipfile writes past 4 GB, written here past 8 bytes
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 2)
    path = tmp_path / "photos.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme_AAAA.txt", b"cp949 readme", compress_type=zipfile.ZIP_STORED)
        for i, (name, data) in enumerate(MEMBERS.items()):
            zf.writestr(name, data, compress_type=(zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)[i % 2])
    monkeypatch.undo()
    raw = bytearray(path.read_bytes())
    assert zipfile.stringEndArchive64 in raw and b"\xff\xff\xff\xff" in raw  # a zip64 end record and marked fields
    with zipfile.ZipFile(path) as zf:
        assert {i.filename: zf.read(i) for i in zf.infolist() if i.filename in MEMBERS} == MEMBERS
    index = ZipIndex(str(path))
    assert all(index.read(name) == data for name, data in MEMBERS.items())
    for signature, flags in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # the readme's name in cp949, flagged UTF-8
        at = raw.find(signature)
        raw[at + flags:at + flags + 2] = (int.from_bytes(raw[at + flags:at + flags + 2], "little") | 0x800).to_bytes(
            2, "little")
    while (at := raw.find(b"readme_AAAA")) >= 0:
        raw[at:at + 11] = b"readme_" + "설명".encode("cp949")
    path.write_bytes(bytes(raw))
    with pytest.raises(UnicodeDecodeError):
        zipfile.ZipFile(path)
    assert set(MEMBERS) <= set(read_central_directory(str(path)))
    assert all(ZipIndex(str(path)).read(name) == data for name, data in MEMBERS.items())


def test_damaged_zip64_records_cost_their_member_or_give_the_damaged_archive_error(tmp_path, monkeypatch):
    """Zip64 fields are 64-bit: a damaged one sent a seek or a read past any file (ValueError, MemoryError,
    OverflowError: a scan or loader worker killed), or lost the whole archive for one member's record."""
    from pillsnap.utils.zips import read_central_directory

    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 8)
    path = tmp_path / "photos.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in MEMBERS.items():
            zf.writestr(name, data, compress_type=zipfile.ZIP_STORED)
    monkeypatch.undo()
    raw = bytes(path.read_bytes())
    first = raw.find(b"PK\x01\x02")
    extra_at = first + 46 + int.from_bytes(raw[first + 28:first + 30], "little")  # after the first record's name
    assert raw[extra_at:extra_at + 2] == b"\x01\x00"  # its zip64 extra field
    lost_extra = bytearray(raw)
    lost_extra[extra_at:extra_at + 2] = b"\x99\x99"
    huge_size = bytearray(raw)
    huge_size[extra_at + 4 + 8:extra_at + 4 + 16] = (2**63).to_bytes(8, "little")  # size, then compressed size
    for damaged in (lost_extra, huge_size):
        path.write_bytes(bytes(damaged))
        assert set(read_central_directory(str(path))) == set(MEMBERS) - {next(iter(MEMBERS))}
        assert ZipIndex(str(path)).read("K-000002/b.png") == MEMBERS["K-000002/b.png"]
    huge_directory = bytearray(raw)
    end64 = raw.rfind(zipfile.stringEndArchive64)
    huge_directory[end64 + 40:end64 + 48] = (2**64 - 1).to_bytes(8, "little")  # its central directory's size
    path.write_bytes(bytes(huge_directory))
    with pytest.raises(zipfile.BadZipFile, match="central directory"):
        read_central_directory(str(path))

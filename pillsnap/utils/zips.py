"""Lean zip reading: a zip's central directory as {name: entry}, member bytes by offset, and a compact index of a
zip's members for reading photos out of it.

zipfile builds a ZipInfo object per member (~10 us) and a ZipExtFile per read (~12 us); the label zips hold
~20-30K members of ~2.7 KB each, so that Python overhead outweighs the JSON parsing. Zip64 archives (the
13-95 GB image zips) are read the same way, so that a member name flagged UTF-8 that is not (a readme in cp949)
costs that member, not the whole zip as in zipfile. A ZipFile kept open also keeps every
member's ZipInfo: the real training photos lie in ~90 zips of ~30,000 members, and every data-loader worker that
kept them all open held gigabytes; ZipIndex keeps a zip's names and offsets in a few numpy arrays instead.
"""

from __future__ import annotations

import logging
import os
import struct
import zipfile
import zlib
from typing import NamedTuple

import numpy as np

LOGGER = logging.getLogger(__name__)
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")  # central directory file header (46 bytes)
_LOCAL = struct.Struct("<4s2B4HL2L2H")  # local file header (30 bytes)
_ZIP64_MARK = 0xFFFFFFFF
_UTF8_FLAG = 0x800


class ZipEntry(NamedTuple):
    header_offset: int
    compress_size: int
    compress_type: int
    crc: int
    flag_bits: int


def _decode_name(raw: bytes, flags: int) -> str:
    if raw.isascii():  # every AI Hub member name (K-codes); ASCII is the same in UTF-8 and cp437, and faster
        return raw.decode("ascii")
    if flags & _UTF8_FLAG:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:  # a name flagged UTF-8 that is not (a readme in cp949): never a K-code member
            pass
    return raw.decode("cp437")


def read_central_directory(path: str) -> dict[str, ZipEntry]:
    """Every member of the zip at `path` with what is needed to read it; BadZipFile for a broken archive."""
    with open(path, "rb") as fh:
        end = zipfile._EndRecData(fh)  # the stdlib's EOCD search (handles comments and the zip64 locator)
        if not end:
            raise zipfile.BadZipFile(f"{path} is not a zip file")
        size, offset = end[zipfile._ECD_SIZE], end[zipfile._ECD_OFFSET]  # zip64's own where the archive has them
        cd_end = end[zipfile._ECD_LOCATION]  # the directory ends where the end records begin
        if end[0] == zipfile.stringEndArchive64:
            cd_end -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator
        if not 0 <= size <= cd_end or not 0 <= offset <= cd_end - size:  # zip64's are 64-bit: any value
            raise zipfile.BadZipFile(f"bad offset or size of the central directory in {path}")
        fh.seek(cd_end - size)  # not `offset`: a zip may be appended to other data
        data = fh.read(size)
    entries: dict[str, ZipEntry] = {}
    concat = cd_end - size - offset  # bytes prepended to the archive, as zipfile computes it
    pos, unpack, head, lost = 0, _CENTRAL.unpack_from, _CENTRAL.size, []
    try:
        while pos < len(data):
            cd = unpack(data, pos)
            if cd[0] != b"PK\x01\x02":
                raise zipfile.BadZipFile(f"bad central directory in {path}")
            name_end = pos + head + cd[12]
            name = _decode_name(data[pos + head:name_end], cd[5])
            pos = name_end + cd[13] + cd[14]
            at = _member_place(data[name_end:name_end + cd[13]], cd, concat, cd_end - size)
            if at is None:  # that member is lost, not the whole zip
                lost.append(name)
                continue
            entries[name] = ZipEntry(at[1], at[0], cd[6], cd[9], cd[5])
    except struct.error as err:
        raise zipfile.BadZipFile(f"bad central directory in {path} ({err})") from err
    if lost:
        LOGGER.warning("%s: %d member(s) with a damaged directory record left out (e.g. %s)", path, len(lost), lost[0])
    return entries


def _member_place(extra: bytes, cd: tuple, concat: int, cd_start: int) -> tuple[int, int] | None:
    """(compressed size, local header offset in the file) of one central directory record, or None where they are
    damaged: a zip64 record without its extra field, or a member that would not lie before the directory."""
    compress_size, header_offset = cd[10], cd[18]
    if _ZIP64_MARK in (cd[10], cd[11], cd[18]):  # the 13-95 GB photo zips: sizes or offsets past 4 GB
        found = _zip64_fields(extra, cd)
        if found is None:
            return None
        compress_size, header_offset = found
    header_offset += concat
    if header_offset < 0 or header_offset + _LOCAL.size + compress_size > cd_start:
        return None
    return compress_size, header_offset


def _zip64_fields(extra: bytes, cd: tuple) -> tuple[int, int] | None:
    """(compressed size, local header offset) of a central directory record whose 32-bit fields are marked as
    kept in its zip64 extra field (id 1), which holds the marked ones of: size, compressed size, offset; None
    where the field is missing or short."""
    pos = 0
    while pos + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, pos)
        if kind == 1:
            values = list(struct.unpack_from(f"<{length // 8}Q", extra, pos + 4))
            marked = [cd[i] == _ZIP64_MARK for i in (11, 10, 18)]  # size, compressed size, offset: in this order
            if sum(marked) > len(values):
                return None
            compress_size = values[marked[0]] if marked[1] else cd[10]
            offset = values[marked[0] + marked[1]] if marked[2] else cd[18]
            return compress_size, offset
        pos += 4 + length
    return None


def read_member(fd: int, entry: ZipEntry, name: str) -> bytes:
    """Bytes of one stored or deflated member via os.pread (safe on a descriptor shared across fork); a damaged
    archive (a header past its end, a short read, a broken deflate stream, a wrong CRC) raises zipfile.BadZipFile,
    which the data loaders drop like any unreadable photo."""
    try:
        return _read_member(fd, entry, name)
    except (struct.error, zlib.error) as err:
        raise zipfile.BadZipFile(f"{name}: damaged member ({err})") from err


def _read_member(fd: int, entry: ZipEntry, name: str) -> bytes:
    if entry.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or entry.flag_bits & 0x1:
        raise zipfile.BadZipFile(f"{name}: unsupported compression {entry.compress_type} or encryption")
    header = _LOCAL.unpack(os.pread(fd, _LOCAL.size, entry.header_offset))
    if header[0] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {name}")
    start = entry.header_offset + _LOCAL.size + header[10] + header[11]  # + file name + extra field
    data = os.pread(fd, entry.compress_size, start)
    if len(data) != entry.compress_size:
        raise zipfile.BadZipFile(f"{name}: truncated ({len(data)} of {entry.compress_size} bytes)")
    if entry.compress_type == zipfile.ZIP_DEFLATED:
        data = zlib.decompress(data, -15)
    if zlib.crc32(data) != entry.crc:
        raise zipfile.BadZipFile(f"CRC mismatch for {name}")
    return data


class ZipIndex:
    """A zip's members for reading them by name: the names sorted in one numpy bytes array, their entries' fields
    in one int64 array (about 100 bytes a member where a ZipFile holds a ~500-byte ZipInfo and its strings), and one
    descriptor read with os.pread, so the index may be shared across fork. A missing member raises KeyError, as
    zipfile does; a damaged one zipfile.BadZipFile."""

    _fd: int | None = None  # until opened: an index whose zip could not be read closes nothing

    def __init__(self, path: str) -> None:
        entries = read_central_directory(path)
        names = sorted(entries)
        self.path = path
        self.names = np.array([name.encode("utf-8") for name in names], dtype=bytes)
        fields = [entries[name] for name in names]
        self.fields = np.array(fields, dtype=np.int64).reshape(len(names), len(ZipEntry._fields))
        self._fd: int | None = os.open(path, os.O_RDONLY)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.names)

    def read(self, name: str) -> bytes:
        key = name.encode("utf-8")
        at = int(np.searchsorted(self.names, key))
        if at >= len(self.names) or self.names[at] != key:
            raise KeyError(f"there is no item named {name!r} in the archive {self.path}")
        entry = ZipEntry(*(int(v) for v in self.fields[at]))
        if entry.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):  # bzip2, lzma: zipfile's own
            try:
                with zipfile.ZipFile(self.path) as opened:
                    return opened.read(name)
            except NotImplementedError as err:  # Deflate64 (a zip Windows wrote over 2 GB) and rarer methods
                raise zipfile.BadZipFile(f"{name} in {self.path}: {err} (method {entry.compress_type}); extract the "
                                         "zip with a tool that reads it, or zip it again with plain deflate") from err
        if self._fd is None:
            raise ValueError(f"{self.path}: the zip index was closed")
        return read_member(self._fd, entry, name)

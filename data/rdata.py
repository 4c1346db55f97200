"""Minimal reader for R lazy-load databases (.rdx/.rdb) holding plain vectors.

Only what installed R data packages need: XDR serialization (versions 2 and 3),
pairlists, symbols, references, and logical/integer/double/character/list vectors.
"""
from __future__ import annotations

import gzip
import struct
import zlib

_NIL, _REF, _SYM, _LIST, _CHAR = 254, 255, 1, 2, 9
_LGL, _INT, _REAL, _STR, _VEC, _EXPR = 10, 13, 14, 16, 19, 20
_SPECIAL = {242: "emptyenv", 241: "baseenv", 253: "globalenv", 252: "unbound", 251: "missing", 247: "basenamespace"}


class _Reader:
    def __init__(self, buf: bytes, where: str):
        self.buf, self.pos, self.where, self.refs = buf, 0, where, []

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise ValueError(f"{self.where}: truncated R serialization stream")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def header(self) -> None:
        if self._take(2) != b"X\n":
            raise ValueError(f"{self.where}: not an XDR R serialization stream")
        version = self.int()
        self.int(), self.int()  # writer R version, minimal reader version
        if version == 3:
            self._take(self.int())  # native encoding name
        elif version != 2:
            raise ValueError(f"{self.where}: unsupported R serialization version {version}")

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & 512), bool(flags & 1024)
        if kind == _NIL:
            return None
        if kind in _SPECIAL:
            return _SPECIAL[kind]
        if kind == _REF:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == _SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == _LIST:
            if has_attr:
                self.item()  # pairlist attributes are not needed
            tag = self.item() if has_tag else None
            head, tail = self.item(), self.item()
            return [(tag, head)] + (tail or [])
        if kind == _CHAR:
            n = self.int()
            latin1 = flags & (1 << 14)  # LATIN1_MASK << 12; everything else is read as UTF-8
            return None if n == -1 else self._take(n).decode("latin-1" if latin1 else "utf-8")
        if kind in (_LGL, _INT):
            n = self.length()
            value = list(struct.unpack(f">{n}i", self._take(4 * n)))
        elif kind == _REAL:
            n = self.length()
            value = list(struct.unpack(f">{n}d", self._take(8 * n)))
        elif kind in (_STR, _VEC, _EXPR):
            value = [self.item() for _ in range(self.length())]
        else:
            raise ValueError(f"{self.where}: unsupported R object type {kind}")
        attrs = dict(self.item()) if has_attr else {}
        if kind == _VEC and "names" in attrs:
            return dict(zip(attrs["names"], value))
        return value


def unserialize(buf: bytes, where: str = "<bytes>"):
    """Decode one R-serialized (XDR) object into Python lists/str/int/float/None."""
    reader = _Reader(buf, where)
    reader.header()
    return reader.item()


def read_lazyload_db(prefix: str) -> dict:
    """Read every variable of an R lazy-load database ``prefix``.rdx/.rdb (zlib-compressed entries)."""
    with open(prefix + ".rdx", "rb") as f:
        index = unserialize(gzip.decompress(f.read()), prefix + ".rdx")
    compressed = index.get("compressed", [1])
    if compressed not in ([1], [True]):
        raise ValueError(f"{prefix}.rdb: only zlib-compressed lazy-load databases are supported")
    with open(prefix + ".rdb", "rb") as f:
        blob = f.read()
    out = {}
    for name, (offset, size) in index["variables"].items():
        entry = blob[offset:offset + size]
        raw = zlib.decompress(entry[4:])
        if len(raw) != struct.unpack(">I", entry[:4])[0]:
            raise ValueError(f"{prefix}.rdb: entry {name!r} has a wrong uncompressed length")
        out[name] = unserialize(raw, f"{prefix}.rdb[{name}]")
    return out

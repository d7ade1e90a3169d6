"""A small, strict reader of R's XDR serialization: enough for the text data that R packages ship.

R writes `saveRDS` files and the records of a package's lazy-load database (`data/Rdata.rdb`,
indexed by `data/Rdata.rdx`) in its serialization format: a 'X\\n' header (XDR, big-endian),
three integers (format version 2 or 3, writer and minimal reader versions), for version 3 the
native encoding, then one item. Each item starts with an integer of flags: the type in the low
8 bits, then bits for "is an object", "has attributes", "has a tag", and 16 bits of levels
(for strings, their encoding).

Supported: NULL, character vectors (with UTF-8, Latin-1, ASCII, bytes and native strings and
NA_character_), lists, pairlists with tags, symbols and references to them, attributes, and
integer, double and logical vectors. Anything else (environments, closures, ALTREP, ...) is a
ValueError that names the type; so is a truncated or trailing-garbage stream. No R is needed.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

# SEXP types (R internals) handled here
NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 0, 1, 2, 9, 10, 13, 14, 16, 19
# pseudo types of the serialization stream
REFSXP, NILVALUE_SXP = 255, 254
TYPE_NAMES = {
    0: "NULL", 1: "symbol", 2: "pairlist", 3: "closure", 4: "environment", 5: "promise", 6: "language",
    7: "special", 8: "builtin", 9: "CHARSXP", 10: "logical", 13: "integer", 14: "double", 15: "complex",
    16: "character", 17: "...", 19: "list", 20: "expression", 21: "bytecode", 22: "externalptr",
    23: "weakref", 24: "raw", 25: "S4", 238: "ALTREP", 239: "ATTRLISTSXP", 240: "ATTRLANGSXP",
    241: "base environment", 242: "empty environment", 244: "BCREPDEF", 245: "GENERICREFSXP",
    246: "CLASSREFSXP", 247: "persistent reference", 248: "package environment", 249: "namespace",
    250: "base namespace", 251: "missing argument", 252: "unbound value", 253: "global environment",
}
IS_OBJECT, HAS_ATTR, HAS_TAG = 1 << 8, 1 << 9, 1 << 10
# CHARSXP levels (encoding bits)
BYTES_MASK, LATIN1_MASK, UTF8_MASK, ASCII_MASK = 1 << 1, 1 << 2, 1 << 3, 1 << 6
NA_INTEGER = -(2**31)
VECTOR_TYPES = {LGLSXP: "logical", INTSXP: "integer", REALSXP: "double", STRSXP: "character", VECSXP: "list"}


@dataclass(frozen=True)
class RSymbol:
    name: str


@dataclass
class RVector:
    """An R vector or pairlist: `type` is 'character', 'list', 'integer', 'double', 'logical' or
    'pairlist'; `data` its elements (None for NA); `attributes` by name; `tags` a pairlist's tags."""

    type: str
    data: list
    attributes: dict = field(default_factory=dict)
    tags: list | None = None
    is_object: bool = False

    @property
    def names(self) -> list | None:
        if self.tags is not None:
            return self.tags
        names = self.attributes.get("names")
        return names.data if isinstance(names, RVector) else None

    def as_dict(self) -> dict:
        """Elements by name (a named list or pairlist); ValueError when names are missing or repeated."""
        names = self.names
        if names is None or any(not isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise ValueError(f"R {self.type} has no unique names")
        return dict(zip(names, self.data))


class _Reader:
    def __init__(self, buf: bytes):
        self.buf, self.pos, self.refs, self.native = buf, 0, [], None

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError(f"R serialization truncated at byte {self.pos} (wanted {n} more, {len(self.buf) - self.pos} left)")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more integers
            hi, lo = self.int(), self.int()
            n = (hi << 32) + (lo & 0xFFFFFFFF)
        if n < 0:
            raise ValueError(f"R serialization has a negative length {n} at byte {self.pos}")
        if n > len(self.buf) - self.pos:  # every element takes at least one byte: a cheap bound against garbage
            raise ValueError(f"R serialization truncated: length {n} at byte {self.pos} exceeds the data left")
        return n

    def header(self) -> None:
        fmt = self.take(2)
        if fmt != b"X\n":
            kinds = {b"A\n": "ASCII", b"B\n": "native binary", b"\x1f\x8b": "gzip-compressed"}
            raise ValueError(f"not R XDR serialization (starts with {fmt!r}: {kinds.get(fmt, 'unknown format')})")
        version = self.int()
        self.int(), self.int()  # writer's R version, minimal reader version
        if version == 3:
            self.native = self.take(self.length()).decode("ascii", "replace")
        elif version != 2:
            raise ValueError(f"R serialization version {version} is not supported (2 or 3 are)")

    def string(self, levels: int) -> str | bytes | None:
        n = self.int()
        if n == -1:
            return None  # NA_character_
        if n < 0:
            raise ValueError(f"R string has a negative length {n} at byte {self.pos - 4}")
        raw = self.take(n)
        if levels & BYTES_MASK:
            return raw
        encoding = "utf-8" if levels & UTF8_MASK else "latin-1" if levels & LATIN1_MASK else "ascii" if levels & ASCII_MASK else self.native or "utf-8"
        try:
            return raw.decode(encoding)
        except (UnicodeDecodeError, LookupError) as exc:
            raise ValueError(f"R string at byte {self.pos - n} is not valid {encoding} ({type(exc).__name__})") from None

    def attributes(self) -> dict:
        attrs = self.item()
        if not isinstance(attrs, RVector) or attrs.type != "pairlist" or any(not isinstance(t, str) for t in attrs.tags or []):
            raise ValueError("R attributes are not a tagged pairlist")
        return dict(zip(attrs.tags, attrs.data))

    def item(self):
        flags = self.int()
        kind, levels = flags & 0xFF, flags >> 12
        if kind == NILVALUE_SXP:
            return None
        if kind == REFSXP:
            index = flags >> 8 or self.int()
            if not 1 <= index <= len(self.refs):
                raise ValueError(f"R serialization refers to unknown reference {index}")
            return self.refs[index - 1]
        if kind == SYMSXP:
            name = self.item()
            if not isinstance(name, str):
                raise ValueError("R symbol has no name")
            symbol = RSymbol(name)
            self.refs.append(symbol)
            return symbol
        if kind == CHARSXP:  # only as a symbol's name here; inside vectors see `vector`
            value = self.string(levels)
            if flags & HAS_ATTR:
                self.item()  # old writers attached the string cache; R ignores it too
            return value
        if kind == LISTSXP:
            return self.pairlist(flags)
        if kind in VECTOR_TYPES:
            return self.vector(kind, flags)
        raise ValueError(f"R serialization holds a {TYPE_NAMES.get(kind, f'type {kind}')} object, which this reader does not support")

    def pairlist(self, flags: int) -> RVector:
        """A pairlist, read cell by cell (iteratively: long pairlists must not hit the recursion limit)."""
        out = RVector("pairlist", [], tags=[], is_object=bool(flags & IS_OBJECT))
        first = True
        while True:
            attrs = self.attributes() if flags & HAS_ATTR else {}
            if first:
                out.attributes, first = attrs, False
            tag = self.item() if flags & HAS_TAG else None
            if tag is not None and not isinstance(tag, RSymbol):
                raise ValueError("R pairlist tag is not a symbol")
            out.tags.append(tag.name if tag else None)
            out.data.append(self.item())
            flags = self.int()
            if flags & 0xFF == NILVALUE_SXP:
                return out
            if flags & 0xFF != LISTSXP:
                raise ValueError(f"R pairlist ends in a {TYPE_NAMES.get(flags & 0xFF, flags & 0xFF)} instead of NULL")

    def vector(self, kind: int, flags: int) -> RVector:
        n = self.length()
        if kind == STRSXP:
            data = []
            for _ in range(n):
                cflags = self.int()
                if cflags & 0xFF != CHARSXP:
                    raise ValueError(f"R character vector holds a {TYPE_NAMES.get(cflags & 0xFF, cflags & 0xFF)} element")
                data.append(self.string(cflags >> 12))
                if cflags & HAS_ATTR:
                    self.item()
        elif kind == VECSXP:
            data = [self.item() for _ in range(n)]
        elif kind == REALSXP:
            data = list(struct.unpack(f">{n}d", self.take(8 * n)))
        else:
            ints = struct.unpack(f">{n}i", self.take(4 * n))
            data = [None if x == NA_INTEGER else (bool(x) if kind == LGLSXP else x) for x in ints]
        attrs = self.attributes() if flags & HAS_ATTR else {}
        return RVector(VECTOR_TYPES[kind], data, attrs, is_object=bool(flags & IS_OBJECT))


def unserialize(buf: bytes):
    """The object of one uncompressed XDR serialization: None, an RSymbol or an RVector."""
    reader = _Reader(buf)
    reader.header()
    value = reader.item()
    if reader.pos != len(buf):
        raise ValueError(f"R serialization has {len(buf) - reader.pos} trailing bytes after the object")
    return value


def read_rds(path: str | Path):
    """The object of an .rds file (gzip-compressed or plain XDR; R's saveRDS default is gzip)."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: damaged gzip data ({exc})") from None
    return unserialize(raw)


def read_lazyload_db(rdb: str | Path, names: list[str] | None = None) -> dict:
    """Objects of an R lazy-load database (`Rdata.rdb` with its index `Rdata.rdx` beside it), by
    name: all of them, or only `names`. Each record is a 4-byte big-endian uncompressed length
    followed by zlib data holding one serialization; the index is an RDS list whose `variables`
    map names to (offset, length) in the .rdb."""
    rdb = Path(rdb)
    index = read_rds(rdb.with_suffix(".rdx"))
    if not isinstance(index, RVector) or index.type != "list":
        raise ValueError(f"{rdb.with_suffix('.rdx')}: not a lazy-load index (no named list)")
    entries = index.as_dict()
    compressed = entries.get("compressed")
    if not isinstance(compressed, RVector) or compressed.data not in ([True], [1]):
        raise ValueError(f"{rdb}: only zlib-compressed lazy-load databases are supported (compressed = {getattr(compressed, 'data', compressed)})")
    variables = entries.get("variables")
    if not isinstance(variables, RVector) or variables.type != "list":
        raise ValueError(f"{rdb.with_suffix('.rdx')}: lazy-load index has no 'variables' list")
    positions = variables.as_dict() if variables.data else {}
    missing = [n for n in names or [] if n not in positions]
    if missing:
        raise ValueError(f"{rdb}: no object named {', '.join(missing)}")
    out = {}
    with open(rdb, "rb") as f:
        for name in names if names is not None else list(positions):
            pos = positions[name]
            if not isinstance(pos, RVector) or pos.type != "integer" or len(pos.data) != 2 or None in pos.data:
                raise ValueError(f"{rdb}: bad index entry for {name}")
            offset, size = pos.data
            f.seek(offset)
            record = f.read(size)
            if size < 4 or len(record) != size:
                raise ValueError(f"{rdb}: record {name!r} truncated ({len(record)} of {size} bytes at offset {offset})")
            expected = struct.unpack(">I", record[:4])[0]
            try:
                payload = zlib.decompress(record[4:])
            except zlib.error as exc:
                raise ValueError(f"{rdb}: record {name!r} is not valid zlib data ({exc})") from None
            if len(payload) != expected:
                raise ValueError(f"{rdb}: record {name!r} holds {len(payload)} bytes, its header says {expected}")
            try:
                out[name] = unserialize(payload)
            except ValueError as exc:
                raise ValueError(f"{rdb}: record {name!r}: {exc}") from None
    return out

"""Named corpora: the R serialization reader on files written here byte by byte, the `austen`
corpus read back from a lazy-load database built here, `licenses`, and the real corpora when present."""

from __future__ import annotations

import gzip
import struct
import zlib

import pytest

from gfprune_ray.corpora import AUSTEN_ENV, AUSTEN_NOVELS, CORPORA, LICENSES_ENV, austen_paragraphs, austen_rdb, licenses_paragraphs
from gfprune_ray.data import read_examples
from gfprune_ray.errors import UserError
from gfprune_ray.rdata import RSymbol, RVector, read_lazyload_db, unserialize

# --- a tiny writer of R's XDR serialization, as R lays it out (serialize.c), for the tests only ---
UTF8, LATIN1, ASCII = 1 << 3, 1 << 2, 1 << 6
HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10
NIL = struct.pack(">i", 254)


def _i(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def _header(version: int = 3) -> bytes:
    return b"X\n" + _i(version, 0x040201, 0x030500) + (_i(5) + b"UTF-8" if version == 3 else b"")


def _charsxp(text: str | None, encoding: str = "utf-8") -> bytes:
    if text is None:
        return _i(9, -1)  # NA_STRING
    raw = text.encode(encoding)
    level = ASCII if raw.isascii() else LATIN1 if encoding == "latin-1" else UTF8
    return _i(9 | level << 12, len(raw)) + raw


def _symbol(name: str, refs: list[str]) -> bytes:
    if name in refs:  # a symbol seen before is a reference: its 1-based index in the flags' upper bits
        return _i((refs.index(name) + 1) << 8 | 255)
    refs.append(name)
    return _i(1) + _charsxp(name)


def _strsxp(items: list, encoding: str = "utf-8", attrs: bytes = b"") -> bytes:
    return _i(16 | (HAS_ATTR if attrs else 0), len(items)) + b"".join(_charsxp(s, encoding) for s in items) + attrs


def _names_attr(names: list[str], refs: list[str]) -> bytes:
    return _i(2 | HAS_TAG) + _symbol("names", refs) + _strsxp(names) + NIL


def _named_list(items: dict[str, bytes], refs: list[str]) -> bytes:
    return _i(19 | HAS_ATTR, len(items)) + b"".join(items.values()) + _names_attr(list(items), refs)


def _pairlist(items: dict[str, bytes], refs: list[str]) -> bytes:
    return b"".join(_i(2 | HAS_TAG) + _symbol(tag, refs) + value for tag, value in items.items()) + NIL


def _write_lazyload_db(folder, objects: dict[str, bytes]) -> None:
    """Rdata.rdb (records: 4-byte uncompressed length, zlib data) and its gzipped index Rdata.rdx."""
    folder.mkdir(parents=True)
    rdb, refs, positions = b"", [], {}
    for name, payload in objects.items():
        record = struct.pack(">I", len(payload)) + zlib.compress(payload)
        positions[name] = _i(13, 2, len(rdb), len(record))
        rdb += record
    variables = _named_list(positions, refs)
    references = _i(19 | HAS_ATTR, 0) + _names_attr([], refs)
    index = _header() + _named_list({"variables": variables, "references": references, "compressed": _i(10, 1, 1)}, refs)
    (folder / "Rdata.rdb").write_bytes(rdb)
    (folder / "Rdata.rdx").write_bytes(gzip.compress(index))


PRIDE = [
    "PRIDE AND PREJUDICE",
    "",
    "By Jane Austen",
    "",
    "Chapter 1",
    "It is a truth universally acknowledged, that a single man in possession",
    "of a good fortune, must be in want of a wife.",
    None,
    "Mr. Bennet made no answer.",
    "",
    "CHAPTER II.",
    "",
    "Mr. Bennet was among the earliest of those who waited on Mr. Bingley. He",
    "had always intended to visit him.",
]
EMMA = ["EMMA", "", "VOLUME I", "Emma Woodhouse, handsome, clever, and rich, with a comfortable home", "and happy disposition, at the caf\u00e9 na\u00efve."]


def _austen_db(tmp_path):
    folder = tmp_path / "janeaustenr" / "data"
    novels = {name: _header() + _strsxp(["short line"]) for name in AUSTEN_NOVELS}
    novels["prideprejudice"] = _header(2) + _strsxp(PRIDE)
    novels["emma"] = _header() + _strsxp(EMMA, encoding="latin-1")
    _write_lazyload_db(folder, novels)
    return folder


def test_unserialize_pairlist_and_named_list_of_character_vectors():
    refs: list[str] = []
    first = _strsxp(["one", None, "caf\u00e9"], encoding="latin-1")
    second = _strsxp(["na\u00efve \u2192 utf-8", ""])
    for version in (2, 3):
        pairlist = unserialize(_header(version) + _pairlist({"a": first, "b": second}, []))
        assert pairlist == RVector("pairlist", [RVector("character", ["one", None, "caf\u00e9"]), RVector("character", ["na\u00efve \u2192 utf-8", ""])], tags=["a", "b"])
    named = unserialize(_header() + _named_list({"x": first, "y": _i(13, 2, 7, -(2**31)), "z": _i(10, 2, 0, 1)}, refs))
    assert named.as_dict() == {"x": RVector("character", ["one", None, "caf\u00e9"]), "y": RVector("integer", [7, None]), "z": RVector("logical", [False, True])}
    assert isinstance(named.attributes["names"], RVector) and named.names == ["x", "y", "z"]
    # the symbol `names` written twice: the second time as a reference to the first
    refs = []
    payload = _i(19, 2) + _symbol("names", refs) + _symbol("names", refs)
    assert payload.endswith(_i(1 << 8 | 255))
    assert unserialize(_header() + payload).data == [RSymbol("names"), RSymbol("names")]


def test_unserialize_refuses_what_it_does_not_know():
    with pytest.raises(ValueError, match="environment"):
        unserialize(_header() + _i(4))
    with pytest.raises(ValueError, match="truncated"):
        unserialize(_header() + _strsxp(["abc"])[:-1])
    with pytest.raises(ValueError, match="trailing"):
        unserialize(_header() + NIL + b"\0")
    with pytest.raises(ValueError, match="version 4"):
        unserialize(b"X\n" + _i(4, 0, 0) + NIL)
    with pytest.raises(ValueError, match="ASCII"):
        unserialize(b"A\n2\n")
    with pytest.raises(ValueError, match="unknown reference 2"):
        unserialize(_header() + _i(2 << 8 | 255))


def test_austen_corpus_reads_a_lazy_load_database_built_here(tmp_path, monkeypatch):
    folder = _austen_db(tmp_path)
    assert read_lazyload_db(folder / "Rdata.rdb", ["emma"])["emma"].data == EMMA
    for where in (folder.parent, folder / "Rdata.rdb"):  # the package folder or the .rdb itself
        monkeypatch.setenv(AUSTEN_ENV, str(where))
        assert austen_rdb() == folder / "Rdata.rdb"
        expected = [  # publication order: Pride and Prejudice (1813) before Emma (1815)
            "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.",
            "Mr. Bennet was among the earliest of those who waited on Mr. Bingley. He had always intended to visit him.",
            "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, at the caf\u00e9 na\u00efve.",
        ]
        assert austen_paragraphs() == expected
        assert read_examples("austen").texts == expected


def test_austen_damaged_or_missing_is_one_line_user_error(tmp_path, monkeypatch):
    folder = _austen_db(tmp_path)
    rdb = folder / "Rdata.rdb"
    rdb.write_bytes(rdb.read_bytes()[:-10])
    monkeypatch.setenv(AUSTEN_ENV, str(rdb))
    with pytest.raises(UserError, match="austen corpus: cannot read .*truncated") as info:
        read_examples("austen")
    assert "\n" not in str(info.value)
    monkeypatch.setenv(AUSTEN_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="make corpora") as info:
        read_examples("austen")
    assert "\n" not in str(info.value)


def test_licenses_corpus_skips_links_and_repeats(tmp_path, monkeypatch):
    shared = "Everyone is permitted to copy and distribute verbatim copies of this license document, but changing it is not allowed."
    (tmp_path / "B-1").write_text(f"B LICENSE\n\n  {shared}\n\nThe first B license grants you the right to do things\nwith the software, under conditions.\n")
    (tmp_path / "A-2").write_text(f"{shared}\n\nThe A license grants you the right to do other things with the software, under other conditions.\n")
    (tmp_path / "A").symlink_to("A-2")
    monkeypatch.setenv(LICENSES_ENV, str(tmp_path))
    assert licenses_paragraphs() == [
        shared,
        "The A license grants you the right to do other things with the software, under other conditions.",
        "The first B license grants you the right to do things with the software, under conditions.",
    ]
    monkeypatch.setenv(LICENSES_ENV, str(tmp_path / "none"))
    with pytest.raises(UserError, match="licenses corpus: no folder"):
        read_examples("licenses")


def test_corpus_names_are_registered():
    assert set(CORPORA) == {"pydoc", "austen", "licenses"}
    assert read_examples("pydoc").texts == CORPORA["pydoc"]()


@pytest.mark.real
def test_real_austen_novels(monkeypatch):
    monkeypatch.delenv(AUSTEN_ENV, raising=False)
    try:
        austen_rdb()
    except UserError:
        pytest.skip("janeaustenr not installed (make corpora)")
    paragraphs = austen_paragraphs()
    assert 6000 < len(paragraphs) < 12000
    assert all(len(p) >= 80 for p in paragraphs)
    assert any(p.startswith("It is a truth universally acknowledged, that a single man in possession of a good fortune") for p in paragraphs)
    assert paragraphs[0].startswith("The family of Dashwood had long been settled in Sussex.")  # Sense and Sensibility comes first
    assert not any(p.upper().startswith("CHAPTER") for p in paragraphs)


@pytest.mark.real
def test_real_common_licenses(monkeypatch):
    monkeypatch.delenv(LICENSES_ENV, raising=False)
    try:
        paragraphs = licenses_paragraphs()
    except UserError:
        pytest.skip("no /usr/share/common-licenses")
    assert len(paragraphs) == len(set(paragraphs)) > 100
    assert all(len(p) >= 80 for p in paragraphs)
    assert any("Apache License" in p or "Licensed under the Apache License" in p for p in paragraphs)

"""Named text corpora for calibration and cross-domain evaluation; `--data NAME` reads them.

- `pydoc`: the English prose every CPython ships in `pydoc_data.topics` (the language reference
  topics); needs no download.
- `austen`: Jane Austen's six novels, as the R package janeaustenr ships them (Debian package
  `r-cran-janeaustenr`), read from its lazy-load database without R (`rdata.py`).
- `licenses`: the license texts of /usr/share/common-licenses, on every Debian system: legal English.

Each corpus is a list of paragraphs: lines joined, split at blank lines, whitespace collapsed,
paragraphs shorter than MIN_PARAGRAPH_CHARS dropped; in a fixed order.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import UserError

MIN_PARAGRAPH_CHARS = 80
AUSTEN_ENV = "GFPRUNE_RAY_AUSTEN"
LICENSES_ENV = "GFPRUNE_RAY_LICENSES"
# the six novels, in order of publication (Northanger Abbey and Persuasion both appeared in 1817)
AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
AUSTEN_HINT = (
    "get it with `make corpora`, or `apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb DIR` "
    f"and {AUSTEN_ENV}=DIR/usr/lib/R/site-library/janeaustenr"
)
R_PACKAGE_DIR = Path("usr/lib/R/site-library/janeaustenr")
HEADING = re.compile(r"(chapter|volume)\s+([ivxlc]+|\d+)\.?", re.IGNORECASE)


def paragraphs(blocks: Iterable[str]) -> list[str]:
    """Paragraphs of texts: split at blank lines, whitespace collapsed, short ones dropped."""
    out = []
    for text in blocks:
        for block in re.split(r"\n\s*\n", text):
            para = " ".join(block.split())
            if len(para) >= MIN_PARAGRAPH_CHARS:
                out.append(para)
    return out


def pydoc_paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    return paragraphs(topics[name] for name in sorted(topics))


def austen_rdb() -> Path:
    """The janeaustenr lazy-load database: from $GFPRUNE_RAY_AUSTEN (the Rdata.rdb or the package
    folder), else where `make corpora` extracts it in this environment, else the system R library."""
    configured = os.environ.get(AUSTEN_ENV)
    if configured:
        path = Path(configured).expanduser()
        for candidate in (path, path / "Rdata.rdb", path / "data" / "Rdata.rdb", path / R_PACKAGE_DIR / "data" / "Rdata.rdb"):
            if candidate.is_file():
                return candidate
        raise UserError(f"austen corpus: no janeaustenr Rdata.rdb at {AUSTEN_ENV}={configured}; {AUSTEN_HINT}")
    share = Path(sys.prefix) / "share" / "gfprune-ray"
    for folder in (share / "janeaustenr-deb" / R_PACKAGE_DIR, share / "janeaustenr", Path("/") / R_PACKAGE_DIR):
        if (folder / "data" / "Rdata.rdb").is_file():
            return folder / "data" / "Rdata.rdb"
    raise UserError(f"austen corpus not found (R package janeaustenr); {AUSTEN_HINT}")


def austen_paragraphs() -> list[str]:
    """The paragraphs of Jane Austen's six novels, in order of publication. NA lines count as blank;
    chapter and volume headings are dropped."""
    from .rdata import read_lazyload_db

    rdb = austen_rdb()
    try:
        novels = read_lazyload_db(rdb, list(AUSTEN_NOVELS))
    except (OSError, ValueError) as exc:
        raise UserError(f"austen corpus: cannot read {rdb}: {exc}") from None
    texts = []
    for name in AUSTEN_NOVELS:
        lines = novels[name]
        if getattr(lines, "type", None) != "character" or any(isinstance(x, bytes) for x in lines.data):
            raise UserError(f"austen corpus: {rdb}: {name} is not a character vector of text")
        texts.append("\n".join("" if line is None or HEADING.fullmatch(line.strip()) else line for line in lines.data))
    return paragraphs(texts)


def licenses_paragraphs() -> list[str]:
    """The paragraphs of every license text in /usr/share/common-licenses ($GFPRUNE_RAY_LICENSES),
    files in name order, symbolic links to files read already skipped, repeated paragraphs dropped."""
    folder = Path(os.environ.get(LICENSES_ENV) or "/usr/share/common-licenses").expanduser()
    if not folder.is_dir():
        raise UserError(f"licenses corpus: no folder {folder} (Debian's common-licenses; set {LICENSES_ENV} to a folder of license texts)")
    entries = sorted(folder.iterdir())
    regular = {p.resolve() for p in entries if p.is_file() and not p.is_symlink()}
    texts = []
    for path in entries:
        if not path.is_file() or (path.is_symlink() and path.resolve() in regular):
            continue
        try:
            texts.append(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise UserError(f"licenses corpus: {path}: not UTF-8 text (bad byte at offset {exc.start})") from None
        except OSError as exc:
            raise UserError(f"licenses corpus: cannot read {path} ({exc.strerror})") from None
    out = list(dict.fromkeys(paragraphs(texts)))
    if not out:
        raise UserError(f"licenses corpus: no paragraphs of text in {folder}")
    return out


CORPORA: dict[str, Callable[[], list[str]]] = {
    "pydoc": pydoc_paragraphs,
    "austen": austen_paragraphs,
    "licenses": licenses_paragraphs,
}

"""Reading plain training text for the text-representation methods (``cliplab textrep train``).

Three layouts, told apart by ``fmt="auto"``:

* ``lines``: a ``.txt`` file (or any file that is not a table), one text per line (blank lines skipped);
* ``sts``: an STS-B file (tab-separated, no header, a numeric score in the fifth field): both sentences of each pair
  (read by :func:`cliplab.eval.sts.read_sts`, so its rejected lines are reported the same way);
* ``table``: a CSV/TSV/JSONL/Parquet table (:func:`cliplab.data.tables.read_table_rows`), one text per row from
  ``column`` (default: the first of ``caption``, ``text``, ``sentence`` the table has).

Texts are stripped; exact duplicates are dropped by default (STS-B repeats sentences; Flickr8k repeats captions), the
first occurrence kept, and the count reported. Rows that cannot be read are listed in ``skipped`` with their line,
never silently lost.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from pathlib import Path

TEXT_COLUMNS = ("caption", "text", "sentence")
FORMATS = ("auto", "lines", "sts", "table")


@dataclass
class TextCorpus:
    texts: list[str]
    source: str
    format: str
    duplicates: int = 0  # exact repeats dropped
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, why) of unreadable rows

    def __len__(self) -> int:
        return len(self.texts)

    def summary(self) -> str:
        extra = [f"{self.duplicates} duplicate(s) dropped"] if self.duplicates else []
        extra += [f"{len(self.skipped)} unreadable line(s) skipped"] if self.skipped else []
        return f"{len(self.texts)} texts from {self.source} ({self.format}" + "".join(f"; {e}" for e in extra) + ")"


def _looks_like_sts(path: Path, encoding: str) -> bool:
    with path.open("rb") as f:
        first = f.readline().decode(encoding, errors="replace").rstrip("\r\n")
    fields = first.split("\t")
    if len(fields) < 7:
        return False
    try:
        float(fields[4])
    except ValueError:
        return False
    return True


def detect_format(path: str | Path, encoding: str = "utf-8") -> str:
    """``sts`` for an STS-B file, ``table`` for a CSV/TSV/JSONL/Parquet table, ``lines`` for anything else."""
    from ..data.tables import TABLE_SUFFIXES

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv") and _looks_like_sts(path, encoding):
        return "sts"
    return "table" if suffix in TABLE_SUFFIXES else "lines"


def read_texts(path: str | Path, *, fmt: str = "auto", column: str | None = None, encoding: str = "utf-8",
               dedupe: bool = True, limit: int | None = None) -> TextCorpus:
    """The texts of ``path`` (module docstring). ``limit`` keeps the first ``limit`` texts (after de-duplication)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown text format {fmt!r}; one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"no text file at {path}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    try:
        codecs.lookup(encoding)  # an unknown encoding fails now, as one clear error
    except LookupError:
        raise ValueError(f"unknown text encoding {encoding!r} (e.g. utf-8, latin-1, cp1252)") from None
    fmt = detect_format(path, encoding) if fmt == "auto" else fmt
    if column is not None and fmt != "table":
        raise ValueError(f"column={column!r} applies to a table, and {path.name} reads as {fmt}")
    skipped: list[tuple[int, str]] = []
    if fmt == "lines":
        raw = []
        with path.open("rb") as f:
            for lineno, line in enumerate(f, start=1):
                try:
                    raw.append(line.decode(encoding))
                except UnicodeDecodeError as e:
                    skipped.append((lineno, f"not valid {encoding} ({e.reason} at byte {e.start})"))
    elif fmt == "sts":
        import warnings

        from ..eval.sts import read_sts

        with warnings.catch_warnings():  # rejected lines are reported through `skipped`
            warnings.simplefilter("ignore")
            data = read_sts(path, encoding=encoding)
        raw = [s for pair in zip(data.first, data.second) for s in pair]
        skipped = list(data.rejected)
    else:
        from ..data.tables import read_table_rows

        table = read_table_rows(path, encoding=encoding)
        if column is None:
            column = next((c for c in TEXT_COLUMNS if c in table.columns), None)
            if column is None:
                raise ValueError(f"{path.name} has no {'/'.join(TEXT_COLUMNS)} column (columns: "
                                 f"{', '.join(table.columns) or 'none'}); name one with column=")
        elif column not in table.columns:
            raise ValueError(f"{path.name} has no column {column!r} (columns: {', '.join(table.columns)})")
        raw = []
        for row, line, error in zip(table.rows, table.lines, table.errors):
            if error:
                skipped.append((line, error))
            else:
                raw.append(str(row.get(column) or ""))
    texts, seen, duplicates = [], set(), 0
    for t in raw:
        t = " ".join(t.split())
        if not t:
            continue
        if dedupe:
            if t in seen:
                duplicates += 1
                continue
            seen.add(t)
        texts.append(t)
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        raise ValueError(f"no text in {path}" + (f" ({len(skipped)} unreadable line(s))" if skipped else ""))
    return TextCorpus(texts, str(path), fmt, duplicates, skipped)

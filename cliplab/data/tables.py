"""Reading tables of image paths and captions, the same way for every command (``embed``, ``eval``, ``train``).

* **Bad text is data, not a stop.** A row with bytes that do not decode in the file's encoding, a JSON line that does
  not parse or a CSV row with the wrong number of fields becomes a row with an ``error`` naming the file and line;
  the good rows are read.
* **One rule for relative image paths** (:func:`image_root_for`): ``image_root`` when given; otherwise the table's
  own folder; and when none of a sample of the table's relative paths exists there but all of them exist in an
  ``images/`` folder beside the table (the layout of Flickr8k-style datasets), that folder, with a note saying so.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet", ".pq")
#: relative paths checked when choosing the image root
ROOT_SAMPLE = 20


@dataclass
class TableRows:
    """``rows[i]`` came from ``lines[i]`` of ``file`` (1-based; the first data row of a CSV with a header is line 2);
    ``errors[i]`` says why the row cannot be used, or is None."""

    file: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: dict[str, Any], line: int, error: str | None = None) -> None:
        self.rows.append(row)
        self.lines.append(line)
        self.errors.append(error)


def _undecodable(value: str, encoding: str) -> str | None:
    """Why a field read with ``surrogateescape`` holds bytes the encoding could not decode, or None."""
    for i, ch in enumerate(value):
        if "\udc80" <= ch <= "\udcff":
            return f"not valid {encoding} (byte {ord(ch) - 0xDC00:#04x} at character {i + 1} of a field)"
    return None


def _never_closed(lines: list[str], dialect: dict) -> bool:
    """True when the CSV record starting at ``lines[0]`` opens a quote that no later line closes."""
    try:
        for _ in csv.reader(io.StringIO("".join(lines), newline=""), strict=True, **dialect):
            return False
    except csv.Error as e:
        return "unexpected end of data" in str(e)
    return False


def _add_csv_row(out: TableRows, header: list[str], values: list[str], line: int, name: str, encoding: str) -> None:
    row = dict(zip(header, values))
    error = next((why for v in values if (why := _undecodable(v, encoding))), None)
    if error is None and any(v.strip() for v in values[len(header):]):  # e.g. an unquoted comma in a caption
        error = f"{len(values)} fields where the header has {len(header)} (quote fields holding commas)"
    if error is not None:
        row = {k: (None if _undecodable(v or "", encoding) else v) for k, v in row.items()}
    out.add(row, line, f"{name}:{line}: {error}" if error else None)


def read_table_rows(path: str | os.PathLike, encoding: str = "utf-8") -> TableRows:
    """The rows of a CSV/TSV/JSONL/Parquet table (see the module docstring)."""
    path = os.fspath(path)
    try:
        codecs.lookup(encoding)  # an unknown encoding fails now, not mid-file
    except LookupError:
        raise ValueError(f"unknown text encoding {encoding!r} (e.g. utf-8, latin-1, cp1252)") from None
    suffix = os.path.splitext(path)[1].lower()
    name = os.path.basename(path)
    if suffix in (".csv", ".tsv"):
        with open(path, "rb") as f:
            raw = f.read()
        if encoding.replace("-", "").lower() in ("utf8", "utf8sig") and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        text = raw.decode(encoding, errors="surrogateescape")
        lines = text.splitlines(keepends=True)
        # TSV: tabs separate and quotes are text ("a "quoted" caption"). CSV is read leniently (a stray inner quote
        # is kept as text, as the csv module does), except that a quote never closed is an error at its own line
        # instead of a field that silently swallows the rest of the file.
        dialect = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if suffix == ".tsv" else dict(delimiter=",")
        header, out, start = None, None, 0
        while start < len(lines):
            reader = csv.reader(io.StringIO("".join(lines[start:]), newline=""), **dialect)
            records, record_line = [], start + 1
            for values in reader:
                records.append((record_line, values))
                record_line = start + reader.line_num + 1
            stop = None
            if records and suffix != ".tsv" and _never_closed(lines[records[-1][0] - 1:], dialect):
                stop = records.pop()[0]  # a quote opened there swallowed the rest of the file
            for line, values in records:
                if header is None:
                    header = values
                    bad = next((why for h in header if (why := _undecodable(h, encoding))), None)
                    if bad:
                        raise ValueError(f"{name}:{line}: the header is {bad}; pass the file's encoding (--encoding)")
                    out = TableRows(path, header)
                elif values and any(v.strip() for v in values):
                    _add_csv_row(out, header, values, line, name, encoding)
            if stop is None:
                break
            if out is None:
                raise ValueError(f"{name}:{stop}: the header has a quote that is never closed")
            out.add({}, stop, f"{name}:{stop}: a quote that is never closed (the rest of the file would be one "
                              "field); the line is skipped")
            start = stop  # the next line starts afresh
        return out if out is not None else TableRows(path, [])
    if suffix in (".jsonl", ".ndjson"):
        out = TableRows(path, [])
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode(encoding))
                except UnicodeDecodeError as e:
                    out.add({}, n, f"{name}:{n}: not valid {encoding} (byte {raw[e.start]:#04x} at column "
                                   f"{e.start + 1})")
                    continue
                except json.JSONDecodeError as e:
                    out.add({}, n, f"{name}:{n}: not valid JSON ({e.msg})")
                    continue
                if not isinstance(row, dict):
                    out.add({}, n, f"{name}:{n}: a JSON {type(row).__name__}, not an object")
                    continue
                out.columns.extend(k for k in row if k not in out.columns)
                out.add(row, n)
        return out
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        out = TableRows(path, list(table.column_names))
        for n, row in enumerate(table.to_pylist()):
            out.add(row, n + 1)  # Parquet has rows, not lines: row numbers, 1-based
        return out
    raise ValueError(f"{path}: unsupported table type {suffix!r} (known: {', '.join(TABLE_SUFFIXES)})")


def image_root_for(table_file: str | os.PathLike, paths, image_root: str | os.PathLike | None = None
                   ) -> tuple[str, str | None]:
    """``(root, note)``: where the table's relative image ``paths`` resolve (module docstring). ``note`` says when
    the ``images/`` folder beside the table was chosen."""
    if image_root is not None:
        root = os.path.abspath(os.fspath(image_root))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image root is not a directory: {root}")
        return root, None
    base = os.path.dirname(os.path.abspath(os.fspath(table_file)))
    rel = [p for p in paths if isinstance(p, str) and p.strip() and not os.path.isabs(os.path.expanduser(p))]
    sample = rel[:ROOT_SAMPLE]
    beside = os.path.join(base, "images")
    if sample and os.path.isdir(beside) and not any(os.path.exists(os.path.join(base, p)) for p in sample) \
            and all(os.path.exists(os.path.join(beside, p)) for p in sample):
        return beside, (f"image paths resolve against {beside} (the images/ folder beside the table; an explicit "
                        "image root sets another)")
    return base, None

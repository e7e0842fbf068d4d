"""Corpus readers: turn input files into a stream of documents and counted defects.

Every reader is streaming: compressed files are decompressed chunk by chunk, parquet and HF datasets are read
in record batches, so memory does not depend on the file size (except a `.txt` read as one document).
Bad records never raise here; they come out as `Defect(reason, "file:line")` so the caller can count them
(or stop on the first under --strict).
"""
import gzip
import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Union

from data_prep.cli import UsageError

# Reasons a record is skipped; the stats file counts each one.
MALFORMED_JSON = "malformed_json"        # not valid JSON, or valid JSON that is not an object
MISSING_TEXT = "missing_text"            # the text field is absent or null
NON_STRING_TEXT = "non_string_text"      # the text field is a number, list, ...
EMPTY = "empty"                          # empty or whitespace-only text
INVALID_UTF8 = "invalid_utf8"            # bytes that are not UTF-8, or lone surrogates from JSON escapes
TRUNCATED = "truncated"                  # compressed stream ends early or is corrupt; the rest is lost
MISSING_SPLIT_FIELD = "missing_split_field"  # --split-by given but the record has no such meta field
REASONS = (MALFORMED_JSON, MISSING_TEXT, NON_STRING_TEXT, EMPTY, INVALID_UTF8, TRUNCATED, MISSING_SPLIT_FIELD)

JSONL_SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz")
SUPPORTED = "'.jsonl', '.jsonl.zst', '.jsonl.gz', '.parquet', '.txt' or an HF dataset saved with save_to_disk"
_CHUNK = 1 << 20


@dataclass
class Doc:
    text: str
    subset: Optional[str]  # value of the --split-by field, None without --split-by


@dataclass
class Defect:
    reason: str
    location: str  # "file:line" (1-based line, or row for parquet / HF datasets)


@dataclass
class InputUnit:
    """One input file (or one split of an HF dataset): becomes one shard."""
    path: str
    kind: str              # jsonl | jsonl.zst | jsonl.gz | parquet | txt | hf
    size: int              # bytes on disk, for progress and the resume fingerprint
    mtime_ns: int
    hf_split: Optional[str] = None

    @property
    def name(self) -> str:
        return f"{self.path}[{self.hf_split}]" if self.hf_split else self.path


def _is_hf_dataset_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json")))


def _file_kind(path: str) -> Optional[str]:
    for suffix in JSONL_SUFFIXES:
        if path.endswith(suffix):
            return suffix[1:]
    for suffix in (".parquet", ".txt"):
        if path.endswith(suffix):
            return suffix[1:]
    return None


def _dir_stats(path: str):
    size, mtime = 0, 0
    for root, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(root, f))
            size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
    return size, mtime


def _hf_units(path: str):
    size, mtime = _dir_stats(path)
    dict_file = os.path.join(path, "dataset_dict.json")
    if not os.path.isfile(dict_file):
        return [InputUnit(path, "hf", size, mtime)]
    try:
        with open(dict_file) as f:
            splits = json.load(f)["splits"]  # stored order (train, validation, ...) is deterministic
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        return [InputUnit(path, "hf", size, mtime)]   # unreadable: reading it reports the error for this unit
    return [InputUnit(path, "hf", size, mtime, hf_split=s) for s in splits]


def discover_inputs(paths) -> list:
    """Expand files and folders into an ordered list of input units; folders are walked in sorted order."""
    units = []
    for path in paths:
        if not os.path.exists(path):
            raise UsageError(f"input not found: {path} (check the path; give files or folders of {SUPPORTED})")
        if os.path.isdir(path):
            if _is_hf_dataset_dir(path):
                units += _hf_units(path)
                continue
            found = []
            for root, dirs, files in os.walk(path):
                dirs.sort()
                hf_dirs = [d for d in dirs if _is_hf_dataset_dir(os.path.join(root, d))]
                for d in hf_dirs:
                    found += _hf_units(os.path.join(root, d))
                dirs[:] = [d for d in dirs if d not in hf_dirs]
                for f in sorted(files):
                    full = os.path.join(root, f)
                    if _file_kind(full):
                        st = os.stat(full)
                        found.append(InputUnit(full, _file_kind(full), st.st_size, st.st_mtime_ns))
            if not found:
                raise UsageError(f"no input files in folder {path} (expected {SUPPORTED})")
            units += sorted(found, key=lambda u: (u.path, u.hf_split or ""))
        else:
            kind = _file_kind(path)
            if kind is None:
                raise UsageError(f"unsupported input file {path} (expected {SUPPORTED})")
            st = os.stat(path)
            units.append(InputUnit(path, kind, st.st_size, st.st_mtime_ns))
    return units


def _split_value(record, split_by):
    """The Pile keeps pile_set_name under "meta"; parquet exports often flatten it to a top-level column."""
    meta = record.get("meta")
    if isinstance(meta, str):  # some exports store meta as a JSON string
        try:
            meta = json.loads(meta)
        except (ValueError, RecursionError):
            meta = None
    value = meta.get(split_by) if isinstance(meta, dict) else None
    if value is None:
        value = record.get(split_by)
    return None if value is None else str(value)


def check_text(text, location, subset_needed=False, subset=None) -> Union[Doc, Defect]:
    """Classify one text value: a document, or the reason it is skipped."""
    if text is None:
        return Defect(MISSING_TEXT, location)
    if not isinstance(text, str):
        return Defect(NON_STRING_TEXT, location)
    if not text or text.isspace():
        return Defect(EMPTY, location)
    if not text.isascii():
        try:
            text.encode("utf-8")  # JSON "\ud800" escapes decode to lone surrogates the tokenizer cannot take
        except UnicodeEncodeError:
            return Defect(INVALID_UTF8, location)
    if subset_needed and subset is None:
        return Defect(MISSING_SPLIT_FIELD, location)
    return Doc(text, subset)


def record_to_doc(record, location, text_key, split_by) -> Union[Doc, Defect]:
    if not isinstance(record, dict):
        return Defect(MALFORMED_JSON, location)
    subset = _split_value(record, split_by) if split_by else None
    return check_text(record.get(text_key), location, bool(split_by), subset)


class _Truncated(Exception):
    pass


class UnreadableInput(Exception):
    """A whole input unit cannot be read (corrupt parquet or saved dataset, no permission, ...).
    The message names the unit and the cause, on one line."""


class UnitReader:
    """Iterate one input unit as Doc / Defect items; `bytes_done` tracks progress in on-disk bytes."""

    def __init__(self, unit: InputUnit, text_key="text", split_by=None, txt_mode="file"):
        self.unit, self.text_key, self.split_by, self.txt_mode = unit, text_key, split_by, txt_mode
        self.bytes_done = 0

    def __iter__(self) -> Iterator[Union[Doc, Defect]]:
        kind = self.unit.kind
        read = (self._jsonl if kind.startswith("jsonl") else self._txt if kind == "txt"
                else self._parquet if kind == "parquet" else self._hf)
        try:
            yield from read()
        except Exception as err:   # noqa: BLE001 - any reader library's failure on this unit is the unit's
            # Bad records are Defects above; what gets here is the file as a whole (pyarrow's ArrowInvalid, a
            # datasets folder with a broken state.json, EACCES, ...): one line naming it, never a traceback.
            cause = " ".join(str(err).split())[:300] or "no details"
            raise UnreadableInput(f"{self.unit.name}: cannot read this {kind} input ({type(err).__name__}: "
                                  f"{cause})") from None
        self.bytes_done = self.unit.size

    # -- line-oriented files -------------------------------------------------------------------------
    def _raw_chunks(self, f):
        """Decompressed byte chunks; raise _Truncated when a compressed stream stops early or is corrupt."""
        kind = self.unit.kind
        if kind.endswith(".zst"):
            import zstandard
            dctx = zstandard.ZstdDecompressor()
            obj, in_frame = dctx.decompressobj(), False
            # Small compressed reads bound the decompressed burst (ratio x read size) held at once.
            while raw := f.read(_CHUNK // 4):
                self.bytes_done = f.tell()
                # zstandard's stream_reader silently stops at a cut; a decompressobj exposes `.eof`.
                while raw:
                    try:
                        out = obj.decompress(raw)
                    except zstandard.ZstdError as err:
                        raise _Truncated() from err
                    in_frame = True
                    if out:
                        yield out
                    if obj.eof:  # a file may hold several frames (pzstd, concatenation)
                        raw, obj, in_frame = obj.unused_data, dctx.decompressobj(), False
                    else:
                        raw = b""
            if in_frame:
                raise _Truncated()
        elif kind.endswith(".gz"):
            gz = gzip.GzipFile(fileobj=f)
            try:
                while out := gz.read1(_CHUNK):  # read1: hand out what decoded before a cut
                    self.bytes_done = f.tell()
                    yield out
            except (EOFError, OSError, gzip.BadGzipFile) as err:
                raise _Truncated() from err
        else:
            while out := f.read(_CHUNK):
                self.bytes_done = f.tell()
                yield out

    def _lines(self, f):
        """(line_number, bytes) for each line; a cut compressed stream drops its unfinished last line."""
        pending, lineno = [], 0  # pieces of the unfinished line: joined once, so a huge line costs O(n)
        try:
            for chunk in self._raw_chunks(f):
                lines = chunk.split(b"\n")
                if len(lines) == 1:
                    pending.append(chunk)
                    continue
                pending.append(lines[0])
                lines[0] = b"".join(pending)
                pending = [lines.pop()]
                for line in lines:
                    lineno += 1
                    yield lineno, line
        except _Truncated:
            yield lineno + 1, None
            return
        if any(pending):
            yield lineno + 1, b"".join(pending)

    def _jsonl(self):
        path = self.unit.path
        with open(path, "rb") as f:
            for lineno, line in self._lines(f):
                loc = f"{path}:{lineno}"
                if line is None:
                    yield Defect(TRUNCATED, loc)
                    return
                if not line.strip():
                    continue  # blank lines separate nothing; they are not documents
                try:
                    record = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError:
                    yield Defect(INVALID_UTF8, loc)
                    continue
                except (ValueError, RecursionError):   # RecursionError: nested deeper than the parser's stack
                    yield Defect(MALFORMED_JSON, loc)
                    continue
                yield record_to_doc(record, loc, self.text_key, self.split_by)

    def _txt(self):
        """txt_mode: 'file' = the whole file is one document, 'line' = one per line,
        'paragraph' = documents separated by blank lines (streaming)."""
        path = self.unit.path
        with open(path, "rb") as f:
            if self.txt_mode == "file":
                data = f.read()
                self.bytes_done = len(data)
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as err:
                    bad_line = data.count(b"\n", 0, err.start) + 1
                    yield Defect(INVALID_UTF8, f"{path}:{bad_line}")
                    return
                yield check_text(text, f"{path}:1", bool(self.split_by), None)
                return
            para, start = [], 1
            for lineno, line in self._lines(f):
                if self.txt_mode == "line":
                    if line.strip():
                        yield self._txt_doc([line], f"{path}:{lineno}")
                elif line.strip():
                    if not para:
                        start = lineno
                    para.append(line)
                elif para:
                    yield self._txt_doc(para, f"{path}:{start}")
                    para = []
            if para:
                yield self._txt_doc(para, f"{path}:{start}")

    def _txt_doc(self, lines, loc):
        try:
            text = b"\n".join(lines).decode("utf-8")
        except UnicodeDecodeError:
            return Defect(INVALID_UTF8, loc)
        return check_text(text, loc, bool(self.split_by), None)

    # -- columnar inputs ----------------------------------------------------------------------------
    def _records_from_columns(self, batch: dict, first_row: int, n_rows: int, where: str):
        for i in range(n_rows):
            record = {k: v[i] for k, v in batch.items()}
            yield record_to_doc(record, f"{where}:{first_row + i + 1}", self.text_key, self.split_by)

    @staticmethod
    def _all_missing(n_rows, where):
        for i in range(n_rows):
            yield Defect(MISSING_TEXT, f"{where}:{i + 1}")

    def _columns_wanted(self, names):
        wanted = [c for c in (self.text_key, "meta", self.split_by) if c and c in names]
        return list(dict.fromkeys(wanted))

    def _parquet(self):
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(self.unit.path)
        total = max(pf.metadata.num_rows, 1)
        columns = self._columns_wanted(pf.schema_arrow.names)
        if self.text_key not in columns:
            yield from self._all_missing(pf.metadata.num_rows, self.unit.path)
            return
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=columns):
            yield from self._records_from_columns(batch.to_pydict(), row, batch.num_rows, self.unit.path)
            row += batch.num_rows
            self.bytes_done = self.unit.size * row // total

    def _hf(self):
        import datasets
        ds = datasets.load_from_disk(self.unit.path)
        if self.unit.hf_split:
            ds = ds[self.unit.hf_split]
        total = max(len(ds), 1)
        columns = self._columns_wanted(ds.column_names)
        if self.text_key not in columns:
            yield from self._all_missing(len(ds), self.unit.name)
            return
        ds = ds.select_columns(columns)
        row = 0
        for batch in ds.iter(batch_size=1024):
            n = len(next(iter(batch.values()))) if batch else 0
            yield from self._records_from_columns(batch, row, n, self.unit.name)
            row += n
            self.bytes_done = self.unit.size * row // total

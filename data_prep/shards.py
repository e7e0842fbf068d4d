"""Tokenizing workers and the shard writer.

Workers run the Rust tokenizer on batches of documents (one thread each: we parallelise with processes, so
N workers use N cores). Results are written strictly in submission order, so the output bytes do not depend
on the number of workers or on timing; at most a few batches are in flight, so memory stays flat.

A shard is written as `X.bin.tmp` / `X.idx.tmp`, renamed when complete (`.idx` last), and only then marked
finished by `<unit>.done.json`: a killed run never leaves a shard that looks complete.
"""
import array
import hashlib
import json
import multiprocessing
import os
import re
import warnings
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor

import numpy

from data_prep.cli import DataError

MAX_EXAMPLES = 5  # file:line locations kept per skip reason

_tok = None
_eod = None
_dtype = None


def init_worker(tokenizer_json: str, eod: int, dtype_name: str):
    """Each worker rebuilds the tokenizer from its JSON: cheap, and it needs only the `tokenizers` package."""
    global _tok, _eod, _dtype
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    from tokenizers import Tokenizer
    _tok, _eod, _dtype = Tokenizer.from_str(tokenizer_json), eod, numpy.dtype(dtype_name)


def encode_texts(texts):
    """-> (flat token array with one EOD after each document, per-document lengths including the EOD).
    Same ids as the HF tokenizer's encode(text) (special tokens per its post-processor), without offsets."""
    ids_lists = [enc.ids for enc in _tok.encode_batch_fast(texts, add_special_tokens=True)]
    lengths = numpy.fromiter((len(ids) + 1 for ids in ids_lists), dtype=numpy.int64, count=len(ids_lists))
    flat = numpy.empty(int(lengths.sum()), dtype=_dtype)
    pos = 0
    for ids, n in zip(ids_lists, lengths):
        flat[pos:pos + n - 1] = ids
        flat[pos + n - 1] = _eod
        pos += n
    return flat, lengths


class OrderedEncoder:
    """Submit batches, get results back in submission order; `workers=0` encodes in this process."""

    def __init__(self, workers: int, tokenizer_json: str, eod: int, dtype_name: str):
        self.pool = None
        self.pending = deque()
        self.max_pending = 2 * workers + 2
        if workers == 0:
            init_worker(tokenizer_json, eod, dtype_name)
        else:
            # forkserver: workers fork from a small server process that imported only this module, not from
            # the main process, which holds torch, transformers and megatron-core (~0.4 GB); a worker needs
            # just `tokenizers`, so each stays small and never inherits threads. A worker that dies (e.g.
            # killed for memory) makes result() raise BrokenProcessPool instead of hanging.
            if "forkserver" in multiprocessing.get_all_start_methods():
                ctx = multiprocessing.get_context("forkserver")
                ctx.set_forkserver_preload([__name__])
            else:
                ctx = multiprocessing.get_context("spawn")
            self.pool = ProcessPoolExecutor(workers, ctx, initializer=init_worker,
                                            initargs=(tokenizer_json, eod, dtype_name))

    def submit(self, tag, texts):
        """Queue one batch; yield the (tag, result) pairs that are due, oldest first."""
        if self.pool is None or not texts:
            self.pending.append((tag, _Done(encode_texts(texts) if texts else None)))
        else:
            self.pending.append((tag, self.pool.submit(encode_texts, texts)))
        while self.pending and (len(self.pending) > self.max_pending or self.pending[0][1].done()):
            tag, future = self.pending.popleft()
            yield tag, future.result()

    def drain(self):
        while self.pending:
            tag, future = self.pending.popleft()
            yield tag, future.result()

    def close(self, abort=False):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=abort)
            self.pool = None


class _Done:
    def __init__(self, value):
        self.value = value

    def done(self):
        return True

    def result(self):
        return self.value


def subset_suffix(subset) -> str:
    """File-name suffix for a --split-by value, one-to-one: "Pile-CC" -> "_Pile-CC", "Ubuntu IRC" -> "_Ubuntu_IRC".

    A value made of letters, digits, '.', '-' and single inner spaces maps to itself with '_' for each space, which
    reads back unambiguously. Anything else ("a_b", "Wikipedia (en)", "a  b") keeps a readable stem and gets
    '~' plus a hash of the exact value, so two values never share a file ('~' never occurs in the plain form)."""
    if subset is None:
        return ""
    if re.fullmatch(r"[A-Za-z0-9.-]+(?: [A-Za-z0-9.-]+)*", subset):
        return "_" + subset.replace(" ", "_")
    stem = re.sub(r"[^A-Za-z0-9.-]+", "_", subset).strip("_")[:80]
    return f"_{stem}~{hashlib.sha256(subset.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"


def subset_collisions(subsets) -> tuple | None:
    """Two --split-by values with the same file suffix (a hash collision), or None. `subsets`: {name: {"suffix"}}."""
    owner = {}
    for name, counts in subsets.items():
        other = owner.setdefault(counts["suffix"], name)
        if other != name:
            return other, name
    return None


def indexed_dataset_module():
    """megatron.core.datasets.indexed_dataset, imported without the package's warnings about GPU libraries."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def indexed_dataset_builder(bin_path, dtype):
    builder = indexed_dataset_module().IndexedDatasetBuilder(bin_path, dtype=dtype)
    # Python lists of ints cost ~36 bytes per entry; typed arrays keep the in-memory index at 8 bytes.
    builder.sequence_lengths = array.array("q")
    builder.document_indices = array.array("q", [0])
    return builder


def replace_atomically(tmp_path, final_path):
    with open(tmp_path, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp_path, final_path)


class UnitStats:
    """Counts for one input unit; summed over units for PREFIX.stats.json."""

    def __init__(self):
        self.documents = self.tokens = self.input_bytes = 0
        self.skipped = Counter()
        self.examples = {}
        self.subsets = {}  # subset name ("" without --split-by) -> {"documents", "tokens", "suffix"}

    def skip(self, reason, location):
        self.skipped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(location)

    def to_json(self):
        return {"documents": self.documents, "tokens": self.tokens, "input_bytes": self.input_bytes,
                "skipped": dict(sorted(self.skipped.items())), "skipped_examples": self.examples,
                "subsets": self.subsets}

    @classmethod
    def from_json(cls, data):
        stats = cls()
        stats.documents, stats.tokens = data["documents"], data["tokens"]
        stats.input_bytes = data.get("input_bytes", 0)
        stats.skipped.update(data["skipped"])
        stats.examples = {k: list(v) for k, v in data["skipped_examples"].items()}
        stats.subsets = data["subsets"]
        return stats

    def add(self, other: "UnitStats"):
        self.documents += other.documents
        self.tokens += other.tokens
        self.input_bytes += other.input_bytes
        self.skipped.update(other.skipped)
        for reason, locs in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(locs[: MAX_EXAMPLES - len(mine)])
        for name, s in other.subsets.items():
            mine = self.subsets.setdefault(name, {"documents": 0, "tokens": 0, "suffix": s["suffix"]})
            mine["documents"] += s["documents"]
            mine["tokens"] += s["tokens"]


class ShardWriter:
    """Writes one input unit's documents to `<shard_prefix><subset suffix>.{bin,idx}` (one file pair per subset)."""

    def __init__(self, shard_prefix: str, dtype, split_by: bool):
        self.shard_prefix, self.dtype, self.split_by = shard_prefix, dtype, split_by
        self.builders = {}
        self.stats = UnitStats()

    def _builder(self, subset):
        if subset not in self.builders:
            suffix = subset_suffix(subset)
            clash = subset_collisions({**self.stats.subsets, subset or "": {"suffix": suffix}})
            if clash:
                raise DataError(f"--split-by values {clash[0]!r} and {clash[1]!r} map to the same output name; "
                                "rename one of them in the data")
            self.builders[subset] = indexed_dataset_builder(self.shard_prefix + suffix + ".bin.tmp", self.dtype)
            self.stats.subsets[subset or ""] = {"documents": 0, "tokens": 0, "suffix": suffix}
        return self.builders[subset]

    def write_batch(self, subsets, flat, lengths):
        ends = numpy.cumsum(lengths)
        for subset, end, n in zip(subsets, ends, lengths):
            self._builder(subset).add_document(flat[end - n:end], [int(n)])
            counts = self.stats.subsets[subset or ""]
            counts["documents"] += 1
            counts["tokens"] += int(n)
        self.stats.documents += len(lengths)
        self.stats.tokens += int(ends[-1]) if len(ends) else 0

    def finish(self, done_path: str):
        if not self.builders and not self.split_by:  # no usable documents: still an (empty) shard to merge
            self._builder(None)
        for subset, builder in self.builders.items():
            final = self.shard_prefix + subset_suffix(subset)
            builder.finalize(final + ".idx.tmp")
            replace_atomically(final + ".bin.tmp", final + ".bin")
            replace_atomically(final + ".idx.tmp", final + ".idx")
        write_json_atomically(done_path, self.stats.to_json())

    def abort(self):
        for subset, builder in self.builders.items():
            builder.data_file.close()
            for ext in (".bin.tmp", ".idx.tmp"):
                path = self.shard_prefix + subset_suffix(subset) + ext
                if os.path.exists(path):
                    os.remove(path)


def write_json_atomically(path, data):
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    replace_atomically(path + ".tmp", path)

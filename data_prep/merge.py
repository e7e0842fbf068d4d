"""Merge Megatron indexed datasets (shards) into one, in the order given.

    python -m data_prep.merge --inputs data/sotu.shards --output-prefix data/sotu
    python -m data_prep.merge --inputs data/part0 data/part1 --output-prefix data/all

An input is a dataset prefix (PATH without .bin/.idx) or a folder, whose datasets are taken in sorted order.
The output is written under temporary names and renamed when complete (.idx last).
"""
import os
import struct
import sys
import time

from data_prep.cli import OneLineArgumentParser, UsageError, run_main
from data_prep.progress import human
from data_prep.shards import indexed_dataset_builder, indexed_dataset_module, replace_atomically


def read_index_header(prefix):
    """-> (numpy dtype, sequence count, document count) from PREFIX.idx."""
    DType = indexed_dataset_module().DType
    with open(prefix + ".idx", "rb") as f:
        header = f.read(34)
    if len(header) < 34 or header[:9] != b"MMIDIDX\x00\x00":
        raise UsageError(f"{prefix}.idx is not a Megatron index file (re-create it with data_prep.tokenize)")
    code = struct.unpack("<B", header[17:18])[0]
    sequences, documents = struct.unpack("<QQ", header[18:34])
    return DType.dtype_from_code(code), sequences, documents


def expand_prefixes(inputs):
    prefixes = []
    for item in inputs:
        for suffix in (".bin", ".idx"):
            item = item[: -len(suffix)] if item.endswith(suffix) else item
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f[:-4]) for f in os.listdir(item) if f.endswith(".idx"))
            if not found:
                raise UsageError(f"no .idx files in folder {item} (give dataset prefixes or a folder of shards)")
            prefixes += found
        else:
            prefixes.append(item)
    for prefix in prefixes:
        missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
        if missing:
            raise UsageError(f"dataset {prefix} not found ({' and '.join(missing)} missing); give prefixes "
                             f"without .bin/.idx, as written by python -m data_prep.tokenize")
    return prefixes


def merge_datasets(prefixes, output_prefix):
    """Concatenate datasets with megatron-core's IndexedDatasetBuilder.add_index; returns (documents, tokens)."""
    if not prefixes:
        raise UsageError("nothing to merge (no input datasets)")
    dtypes = {p: read_index_header(p)[0] for p in prefixes}
    dtype = dtypes[prefixes[0]]
    for prefix, other in dtypes.items():
        if other != dtype:
            raise UsageError(f"{prefix} holds {other.__name__} token ids but {prefixes[0]} holds "
                             f"{dtype.__name__}: they were tokenized with different vocabularies")
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in prefixes}:
        raise UsageError(f"--output-prefix {output_prefix} is also an input (choose another prefix)")
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    builder = indexed_dataset_builder(output_prefix + ".bin.tmp", dtype)
    for prefix in prefixes:
        builder.add_index(prefix)
    builder.finalize(output_prefix + ".idx.tmp")
    replace_atomically(output_prefix + ".bin.tmp", output_prefix + ".bin")
    replace_atomically(output_prefix + ".idx.tmp", output_prefix + ".idx")
    tokens = os.path.getsize(output_prefix + ".bin") // dtype().itemsize
    return len(builder.document_indices) - 1, tokens


def main(argv=None):
    p = OneLineArgumentParser(prog="python -m data_prep.merge", description=__doc__.split("\n")[0])
    p.add_argument("--inputs", "--input", nargs="+", required=True, help="dataset prefixes or folders of them")
    p.add_argument("--output-prefix", required=True, help="output PATH (writes PATH.bin and PATH.idx)")
    args = p.parse_args(argv)
    prefixes = expand_prefixes(args.inputs)
    t0 = time.time()
    documents, tokens = merge_datasets(prefixes, args.output_prefix)
    print(f"merged {len(prefixes)} dataset(s): {documents} documents, {human(tokens)} tokens "
          f"-> {args.output_prefix}.bin/.idx in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    sys.exit(run_main(main))

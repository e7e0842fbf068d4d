"""Training-side data: the `data:` config section and the blended train/valid/test datasets.

Built with megatron-core's BlendedMegatronDatasetBuilder + GPTDataset, so the sample order is the one Megatron
would give for the same seed, and the index files (document/sample/shuffle, blend) are cached on disk.
Works in a plain single process (no torch.distributed group) and under a process group, where rank 0 builds
the cache first and the other ranks load it (megatron-core's own barrier logic).
"""
import contextlib
import os
import struct
import warnings
from collections import OrderedDict
from typing import Callable, Optional

import numpy
import torch

from data_prep.data_config import DataConfig
from data_prep.hf_tokenizer import load_tokenizer, token_dtype  # noqa: F401  (load_tokenizer re-exported)

TOKENIZE_HINT = "python -m data_prep.tokenize --input FILES --tokenizer DIR --output-prefix {prefix}"




class MegatronHFTokenizer:
    """The few tokenizer attributes megatron-core's GPTDataset uses (vocab_size, eod, pad, unique_identifiers),
    backed by an HF fast tokenizer. `unique_identifiers` enters the index-cache hash, so it must be stable."""

    def __init__(self, path: str):
        self.hf = load_tokenizer(path)
        self.vocab_size = len(self.hf)  # includes added special tokens, unlike hf.vocab_size
        self.eod = self.eos = self.hf.eos_token_id
        pad = self.hf.pad_token_id
        # Megatron masks labels equal to `pad`; a pad that is also EOD would mask every document end.
        self.pad = -1 if pad is None or pad == self.eod else pad
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_path", os.path.normpath(path)),
             ("vocab_size", self.vocab_size), ("eod", self.eod)])

    def tokenize(self, text: str) -> numpy.ndarray:
        return numpy.array(self.hf.encode(text), dtype=numpy.int64)

    def detokenize(self, ids) -> str:
        return self.hf.decode(list(map(int, ids)))


def parse_blend(entries, what="data.prefixes"):
    """[[w, prefix] | prefix, ...] -> (prefixes, weights); weights None for one prefix (no blending needed)."""
    if isinstance(entries, str):
        entries = [entries]
    if not entries:
        raise ValueError(f"{what} is empty (give [[weight, prefix], ...] or a list of prefixes)")
    prefixes, weights = [], []
    for entry in entries:
        if isinstance(entry, str):
            weight, prefix = 1.0, entry
        elif isinstance(entry, (list, tuple)) and len(entry) == 2:
            weight, prefix = entry
            if isinstance(weight, str) and not isinstance(prefix, str):  # tolerate [prefix, weight]
                weight, prefix = prefix, weight
        else:
            raise ValueError(f"bad entry {entry!r} in {what} (expected [weight, prefix] or a prefix string)")
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"bad weight {weight!r} in {what} (expected a number)") from None
        if weight <= 0:
            raise ValueError(f"weight {weight} for {prefix} in {what} must be > 0")
        prefix = str(prefix)
        for suffix in (".bin", ".idx"):
            prefix = prefix[: -len(suffix)] if prefix.endswith(suffix) else prefix
        prefixes.append(prefix)
        weights.append(weight)
    return prefixes, (None if len(prefixes) == 1 else weights)


def check_prefix(prefix: str, tokenizer: Optional[MegatronHFTokenizer] = None):
    """Fail early, in one line, on a missing dataset or one tokenized with a vocabulary of another size."""
    missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"dataset {prefix} not found ({' and '.join(missing)} missing); "
                         f"create it with `{TOKENIZE_HINT.format(prefix=prefix)}`")
    with open(prefix + ".idx", "rb") as f:
        header = f.read(18)
    if len(header) < 18 or header[:9] != b"MMIDIDX\x00\x00":
        raise ValueError(f"{prefix}.idx is not a Megatron index (rerun `{TOKENIZE_HINT.format(prefix=prefix)}`)")
    if tokenizer is not None:
        from megatron.core.datasets.indexed_dataset import DType
        stored = DType.dtype_from_code(struct.unpack("<B", header[17:18])[0])
        if stored != token_dtype(tokenizer.vocab_size):
            raise ValueError(f"{prefix} holds {stored.__name__} token ids but the tokenizer has "
                             f"{tokenizer.vocab_size} tokens: it was tokenized with another tokenizer "
                             f"(set data.tokenizer to that one, or re-tokenize)")


def _document_count(prefix: str) -> int:
    with open(prefix + ".idx", "rb") as f:
        header = f.read(34)   # magic 9, version 8, dtype 1, sequence count 8, document count 8 (+1 sentinel)
    return struct.unpack("<Q", header[26:34])[0] - 1


def _check_splits_have_documents(prefixes, split_matrix, split: str):
    """An empty split would make megatron-core loop forever looking for samples; say so in one line instead."""
    names = ("train", "valid", "test")
    for prefix in prefixes:
        docs = _document_count(prefix)
        for name, bounds in zip(names, split_matrix):
            if bounds is None:
                continue
            begin, end = (int(round(b * float(docs))) for b in bounds)
            if end <= begin:
                raise ValueError(f"data.split={split} leaves the {name} split of {prefix} with none of its {docs} "
                                 f"documents; tokenize more documents, change data.split, or set data.valid_prefixes")


@contextlib.contextmanager
def _rank_zero_without_process_group():
    """megatron-core 0.16's BlendedDataset calls torch.distributed.get_rank() on an index-cache miss without
    checking is_initialized(), which raises in a plain single process. With no group we *are* rank 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    original = torch.distributed.get_rank
    torch.distributed.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        torch.distributed.get_rank = original


def build_datasets(cfg: DataConfig, seq_length: int, seed: int, num_samples,
                   is_built_on_rank: Optional[Callable[[], bool]] = None):
    """Return (train, valid, test): GPTDataset / BlendedDataset, or None for a split with weight or samples 0.

    num_samples: (train, valid, test) sample counts; a blend draws them in proportion to its weights.
    Every rank of a process group must call this (megatron-core synchronises with barriers).
    Items are dicts of `tokens`, `labels` (tokens shifted by one), `loss_mask`, `position_ids`, each
    `seq_length` long (BlendedDataset items add `dataset_id`).
    """
    with warnings.catch_warnings():  # megatron.core's package import warns about optional GPU libraries
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if len(num_samples) != 3:
        raise ValueError(f"num_samples must be (train, valid, test), got {num_samples!r}")
    tokenizer = MegatronHFTokenizer(cfg.tokenizer)
    train_blend = parse_blend(cfg.prefixes)
    valid_blend = parse_blend(cfg.valid_prefixes, "data.valid_prefixes") if cfg.valid_prefixes else None
    for prefix in train_blend[0] + (valid_blend[0] if valid_blend else []):
        check_prefix(prefix, tokenizer)
    cache_dir = cfg.cache_dir or os.path.join(os.path.dirname(os.path.abspath(train_blend[0][0])), "index-cache")

    if valid_blend:
        split_args = dict(blend_per_split=[train_blend, valid_blend, None])
    else:
        split_args = dict(blend=train_blend, split=cfg.split)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, path_to_cache=cache_dir, tokenizer=tokenizer,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=cfg.eod_mask_loss,
        create_attention_mask=False,  # the model applies its own causal mask
        **split_args)
    # A split asked for 0 samples is not built at all (Megatron would build a whole epoch for it).
    sizes = [int(n) for n in num_samples]
    wanted = [n > 0 for n in sizes]
    if valid_blend:
        config.blend_per_split = [b if w else None for b, w in zip(config.blend_per_split, wanted)]
    else:
        config.split_matrix = [m if w else None for m, w in zip(config.split_matrix, wanted)]
    if not valid_blend:
        _check_splits_have_documents(train_blend[0], config.split_matrix, cfg.split)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank or (lambda: True), config)
    with _rank_zero_without_process_group():
        datasets = builder.build()
    return tuple(datasets)

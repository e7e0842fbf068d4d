"""Loading a local Hugging Face tokenizer folder, with errors that say what to do, and the token dtype rule."""
import os

import numpy

from data_prep.cli import UsageError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_HINT = "python -m data_prep.train_tokenizer --input FILES --vocab-size N --output DIR"


class TokenizerError(UsageError, ValueError):
    """A tokenizer folder that cannot be used; a ValueError for library callers, exit 2 for the CLIs."""


def load_tokenizer(path):
    """Load a fast (Rust-backed) HF tokenizer from a local folder; no hub downloads.

    The tokenizer must define an end-of-document token (its eos token): one is appended after every document.
    """
    path = str(path)
    if not os.path.isdir(path) and not os.path.isabs(path) and os.path.isdir(os.path.join(_REPO_ROOT, path)):
        path = os.path.join(_REPO_ROOT, path)  # bundled assets/tokenizers/... also work outside the repo root
    if not os.path.isdir(path):
        raise TokenizerError(f"tokenizer folder not found: {path} (give a local HF tokenizer folder, "
                             f"e.g. assets/tokenizers/gpt2, or train one with `{TRAIN_HINT}`)")
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise TokenizerError(f"no tokenizer in {path} (expected tokenizer.json or tokenizer_config.json "
                             f"as written by save_pretrained; train one with `{TRAIN_HINT}`)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we parallelise with processes, not threads
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # transformers raises many types here; all mean "this folder is not usable"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TokenizerError(f"cannot load the tokenizer in {path}: {first_line} "
                             f"(it must be a folder written by save_pretrained)") from None
    if getattr(tok, "backend_tokenizer", None) is None:
        raise TokenizerError(f"tokenizer in {path} is not a fast (tokenizers-backed) tokenizer "
                             f"(add a tokenizer.json, e.g. by re-saving it with transformers)")
    if tok.eos_token_id is None:
        raise TokenizerError(f"tokenizer in {path} has no eos token, which marks the end of each document "
                             f"(set eos_token in its tokenizer_config.json)")
    return tok


def token_dtype(vocab_size: int):
    """uint16 when every id fits (halves the .bin), int32 otherwise; the same rule GPTDatasetConfig applies."""
    return numpy.uint16 if vocab_size <= numpy.iinfo(numpy.uint16).max + 1 else numpy.int32

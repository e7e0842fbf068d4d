"""python -m pretrain.import_hf --hf HF_DIR --output RUN_DIR [--config configs/X.yaml] [section.key=value ...]

Turns a Hugging Face Llama folder (our export, or a plain Llama without a module) into a RUN_DIR:

    RUN_DIR/config.yaml              the resolved config: --config (default configs/tiny.yaml) with the model
                                     section replaced by the HF shapes, data.tokenizer -> RUN_DIR/tokenizer
    RUN_DIR/tokenizer/               the HF folder's tokenizer files
    RUN_DIR/init/model.safetensors   the full one-device state dict (our key names, fp32)
    RUN_DIR/draft_vocab.safetensors  an export's draft vocabulary, with its module (recycle.draft_vocab set to
                                     its size, so further training keeps the rows the module learned)

A plain Llama gets a freshly initialised module (`torch.manual_seed(seed); RecycleGPT(cfg)`, exactly the
trainer's own initialisation) with model.recycle_layers from --config; training only the module on top of it
(recycle.detach_base=true) is suggested. Errors are one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import fields
from pathlib import Path

INIT_FILE = Path("init") / "model.safetensors"
# Tokenizer, special tokens and chat template (transformers 5 writes the template to chat_template.jinja).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")


class ImportError_(Exception):
    """Bad input to the importer; shown as one line."""


def exported_draft_vocab(hf_dir: Path, vocab_size: int):
    """The draft vocabulary an export carries beside its module (pretrain.export_hf), checked, or None."""
    from model.draft_vocab import FILE_NAME, DraftVocab

    if not (hf_dir / FILE_NAME).is_file():
        return None
    try:
        return DraftVocab.load(hf_dir / FILE_NAME, vocab_size)
    except ValueError as err:
        raise ImportError_(str(err)) from None


def model_section(cfg) -> dict:
    """{preset, overrides} reproducing `cfg`: the closest preset plus the fields that differ."""
    from model.config import PRESETS

    names = [f.name for f in fields(cfg)]
    best = min(PRESETS, key=lambda p: sum(getattr(PRESETS[p], n) != getattr(cfg, n) for n in names))
    return {"preset": best, "overrides": {n: getattr(cfg, n) for n in names
                                          if getattr(PRESETS[best], n) != getattr(cfg, n)}}


def import_hf(hf_dir: Path, output: Path, config: str | None = None, overrides=(), force: bool = False) -> Path:
    import torch
    from safetensors.torch import save_file

    from model import RecycleGPT
    from model.draft_vocab import FILE_NAME as DRAFT_VOCAB_FILE
    from pretrain.config import ConfigError, RunConfig, _build, load_config, save_config, validate
    from pretrain.hf_convert import from_hf
    from pretrain.hf_dir import ModelLoadError, read_hf_dir

    hf_dir, output = Path(hf_dir), Path(output)
    if not (hf_dir / "config.json").is_file():
        raise ImportError_(f"{hf_dir} is not a Hugging Face model folder (no config.json)")
    if output.exists() and any(output.iterdir()) and not force:
        raise ImportError_(f"output {output} exists and is not empty; pass --force to replace it")
    try:
        run_cfg = load_config(config or "configs/tiny.yaml", list(overrides))
        default_module = run_cfg.model.build().recycle_layers
        cfg, base, module = read_hf_dir(hf_dir, default_recycle_layers=default_module)
    except (ConfigError, ModelLoadError, ValueError) as err:
        raise ImportError_(str(err)) from None
    torch.manual_seed(run_cfg.seed)
    model = RecycleGPT(cfg)             # the trainer's initialisation; the HF weights replace what they cover
    missing, unexpected = model.load_state_dict(from_hf(cfg, base, module), strict=False)
    if unexpected or any(not k.startswith("recycle.") for k in missing):
        raise ImportError_(f"{hf_dir}: weights do not match the config (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    fresh_module = bool(missing)
    module_init = run_cfg.recycle.init if fresh_module else None
    tree = run_cfg.to_dict()
    draft_vocab = None if fresh_module else exported_draft_vocab(hf_dir, cfg.vocab_size)
    if draft_vocab is not None:
        tree["recycle"]["draft_vocab"] = len(draft_vocab)
    tree["model"] = model_section(cfg)
    tree["run"]["dir"] = str(output)
    tree["data"]["tokenizer"] = str(output / "tokenizer")
    if tree["train"]["seq_length"] > cfg.max_seq_len:
        print(f"train.seq_length {tree['train']['seq_length']} -> {cfg.max_seq_len} (the model's context)")
        tree["train"]["seq_length"] = cfg.max_seq_len
    try:
        run_cfg = _build(RunConfig, tree, "")   # typed and validated like a training config
        validate(run_cfg)
    except (ConfigError, ValueError) as err:
        raise ImportError_(str(err)) from None

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / INIT_FILE).parent.mkdir(parents=True)
        state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
        if module_init == "base_last_layers":
            from model.recycle import init_from_base_layers
            state = init_from_base_layers(state, cfg)
        save_file(state, str(tmp / INIT_FILE), metadata={"format": "pt", "source": str(hf_dir)})
        (tmp / "tokenizer").mkdir()
        for name in TOKENIZER_FILES:
            if (hf_dir / name).is_file():
                shutil.copy2(hf_dir / name, tmp / "tokenizer" / name)
        save_config(run_cfg, tmp / "config.yaml")
        if draft_vocab is not None:
            draft_vocab.save(tmp / DRAFT_VOCAB_FILE)
        (tmp / "init" / "source.json").write_text(json.dumps({"hf_dir": str(hf_dir), "fresh_module": fresh_module,
                                                                   "module_init": module_init}))
        from pretrain.export_hf import replace_dir
        replace_dir(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if draft_vocab is not None:
        print(f"{hf_dir} drafts over a {len(draft_vocab)}-token draft vocabulary: copied to {output}, "
              f"recycle.draft_vocab={len(draft_vocab)}")
    if fresh_module:
        how = "from the base's last layers" if module_init == "base_last_layers" else f"at random (seed {run_cfg.seed})"
        print(f"{hf_dir} has no recyclable module: initialised a fresh {cfg.recycle_layers}-layer module {how}; "
              "suggest training only the module: recycle.detach_base=true (and recycle.init=base_last_layers, "
              "recycle.target=base)")
    return output


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.import_hf", description=__doc__.splitlines()[0])
    p.add_argument("--hf", required=True, help="HF_DIR (our export or a plain Llama folder)")
    p.add_argument("--output", required=True, help="RUN_DIR to create")
    p.add_argument("--config", default=None, help="training config to start from (default configs/tiny.yaml)")
    p.add_argument("--force", action="store_true", help="replace a non-empty RUN_DIR")
    p.add_argument("overrides", nargs="*", help="section.key=value for the non-model sections, e.g. train.steps=500")
    args = p.parse_args(argv)
    try:
        out = import_hf(Path(args.hf), Path(args.output), args.config, args.overrides, args.force)
    except ImportError_ as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"imported {args.hf} -> {out} (start weights {out / INIT_FILE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

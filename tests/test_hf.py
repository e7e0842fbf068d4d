"""HF export / import: vanilla transformers loads the base, the remote code decodes like ours, round trips."""
import json

import pytest
import torch

from tests.helpers import SMALL, cli

pytestmark = pytest.mark.slow   # trains a run through the CLI first (module fixture)

MODES = ("standard", "recycle", "verify")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, sotu_paragraphs_prefix):
    from pretrain.export_hf import main as export_main

    base = tmp_path_factory.mktemp("hf")
    run = base / "run"
    cli("-m", "pretrain.train", "--config", "configs/tiny.yaml", *SMALL, f"data.prefixes=[{sotu_paragraphs_prefix}]",
        f"run.dir={run}", "train.steps=2", "log.plot=false", "log.tensorboard=false")
    assert export_main(["--checkpoint", str(run), "--output", str(base / "hf")]) == 0
    return run, base / "hf"


def ours(run):
    from pretrain.checkpoint import load_for_inference
    return load_for_inference(run)


def test_layout_and_vanilla_llama_loads_with_equal_logits(exported):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    run, hf = exported
    names = {p.name for p in hf.iterdir()}
    assert {"model.safetensors", "recycle_module.safetensors", "config.json", "generation_config.json",
            "tokenizer.json", "modeling_recyclegpt.py"} <= names
    conf = json.loads((hf / "config.json").read_text())
    assert conf["model_type"] == "llama" and conf["recycle_layers"] == 1
    assert conf["auto_map"]["AutoModelForCausalLM"] == "modeling_recyclegpt.RecycleGPTForCausalLM"
    model, tok = ours(run)
    llama, info = LlamaForCausalLM.from_pretrained(hf, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    auto = AutoModelForCausalLM.from_pretrained(hf)      # no custom code unless asked for
    assert type(auto) is LlamaForCausalLM
    ids = torch.tensor([tok.encode("The Congress of the United States shall")])
    with torch.no_grad():
        expected = model.logits(model.hidden(ids))
        got = llama(ids).logits
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


def test_remote_code_decodes_like_ours_in_every_mode(exported):
    from transformers import AutoModelForCausalLM

    from inference.decoding import greedy_generate

    run, hf = exported
    model, tok = ours(run)
    remote = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True)
    assert type(remote).__name__ == "RecycleGPTForCausalLM" and remote.recycle is not None
    prompt = tok.encode("We hold these truths")
    for mode in MODES:
        want = greedy_generate(model, prompt, mode, 12).tokens
        got = remote.recycle_generate(torch.tensor([prompt]), mode=mode, max_new_tokens=12)
        assert got[0, len(prompt):].tolist() == want, mode
    # The module's math itself, not only argmaxes of a barely trained model: g equals ours.
    ids = torch.tensor([prompt])
    with torch.no_grad():
        h = model.hidden(ids)
        nxt = torch.cat([ids[:, 1:], ids[:, :1]], 1)
        want_g = model.recycle_hidden(h, nxt)
        got_g = remote.draft_step(h, nxt)
    assert torch.allclose(got_g, want_g, atol=1e-5, rtol=0), (got_g - want_g).abs().max()
    # The module's own predictions matter: recycle differs from standard on an untrained model.
    assert greedy_generate(model, prompt, "recycle", 12).tokens != greedy_generate(model, prompt, "standard", 12).tokens


def test_generate_cli_and_import_export_round_trip(exported, tmp_path):
    from safetensors.torch import load_file

    from pretrain.export_hf import main as export_main
    from pretrain.import_hf import main as import_main

    run, hf = exported
    proc = cli("-m", "inference.generate", "--model", str(hf), "--prompt", "The Congress", "--mode", "verify",
               "--max-new-tokens", "5")
    assert proc.stdout.startswith("The Congress") and "[verify] 5 tokens" in proc.stderr
    # stdout is the generated text alone (nothing a loader prints), so piped output is the same on every run. The
    # path that imports DeepSpeed (--tp 2 under torchrun) is checked in test_inference_tp.py.
    from inference.decoding import greedy_generate
    model, tok = ours(run)
    prompt = tok.encode("The Congress")
    want = tok.decode(prompt + greedy_generate(model, prompt, "verify", 5, eos_id=tok.eos_token_id).tokens,
                      skip_special_tokens=True)
    proc = cli("-m", "inference.generate", "--model", str(run), "--prompt", "The Congress", "--mode", "verify",
               "--max-new-tokens", "5")
    assert proc.stdout == want + "\n", proc.stdout
    assert import_main(["--hf", str(hf), "--output", str(tmp_path / "run2")]) == 0
    from inference.loading import load_model_dir
    model2, tok2 = load_model_dir(tmp_path / "run2", torch.float32, "cpu")   # imported, not trained yet
    model, _ = ours(run)
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    # export the imported weights again through the same writer: identical files
    from pretrain.config import load_config
    from pretrain.export_hf import write_hf_dir
    cfg = load_config(str(tmp_path / "run2" / "config.yaml")).model.build()
    (tmp_path / "hf2").mkdir()
    write_hf_dir(tmp_path / "hf2", cfg, load_file(str(tmp_path / "run2/init/model.safetensors")), "fp32",
                 tmp_path / "run2" / "tokenizer")
    for name in ("model.safetensors", "recycle_module.safetensors"):
        a, b = load_file(str(hf / name)), load_file(str(tmp_path / "hf2" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((hf / "config.json").read_text()) == json.loads((tmp_path / "hf2/config.json").read_text())
    # one-line errors
    assert export_main(["--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "x")]) == 2
    assert export_main(["--checkpoint", str(tmp_path / "run2"), "--output", str(tmp_path / "x")]) == 2  # no ckpt
    assert export_main(["--checkpoint", str(run), "--output", str(hf)]) == 2                          # not empty


def test_plain_llama_import_gets_a_fresh_module(exported, tmp_path, capsys):
    import shutil

    from pretrain.import_hf import main as import_main

    _, hf = exported
    plain = tmp_path / "plain"
    shutil.copytree(hf, plain)
    (plain / "recycle_module.safetensors").unlink()
    conf = json.loads((plain / "config.json").read_text())
    for k in ("recycle_layers", "recycle_module_file", "auto_map"):
        conf.pop(k)
    (plain / "config.json").write_text(json.dumps(conf))
    assert import_main(["--hf", str(plain), "--output", str(tmp_path / "run")]) == 0
    assert "recycle.detach_base=true" in capsys.readouterr().out
    from inference.loading import load_model_dir
    model, _ = load_model_dir(tmp_path / "run", torch.float32, "cpu")
    assert model.recycle is not None and model.cfg.recycle_layers == 1


def test_training_continues_from_an_imported_run(exported, tmp_path, sotu_paragraphs_prefix):
    """pretrain.train on an imported RUN_DIR starts from RUN_DIR/init, not from random weights."""
    from pretrain.config import load_config
    from pretrain.data import Batches, build_run_datasets
    from pretrain.import_hf import main as import_main

    run, hf = exported
    run2 = tmp_path / "run2"
    assert import_main(["--hf", str(hf), "--output", str(run2)]) == 0
    overrides = [f"data.prefixes=[{sotu_paragraphs_prefix}]", "data.tokenizer=assets/tokenizers/sotu-bpe-8k",
                 "train.steps=1", "train.micro_batch_size=2", "train.global_batch_size=2", "train.seq_length=64",
                 "log.plot=false", "log.tensorboard=false", f"run.dir={run2}"]
    cli("-m", "pretrain.train", "--config", str(run2 / "config.yaml"), *overrides)
    first = json.loads((run2 / "metrics.jsonl").read_text().splitlines()[0])
    cfg = load_config(str(run2 / "config.yaml"))
    batch = Batches(build_run_datasets(cfg, 1)[0], 0, 2, 0, 1).next()
    model, _ = ours(run)   # the weights that were exported, then imported
    with torch.no_grad():
        expected = model(batch["tokens"], batch["labels"], batch["loss_mask"]).loss.item()
    assert first["step"] == 1 and abs(first["loss"] - expected) < 1e-5 * expected

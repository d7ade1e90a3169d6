"""The real command line, run as a user runs it: `gfprune-ray` in a subprocess.

Every run gets a tiny BERT saved to disk with a matching WordPiece tokenizer, so the whole path
(load, read data, collect, plan, cut, evaluate, save) is the one a real model takes. Bad input must
end with exactly one line on stderr that names the bad thing, exit code 2, and nothing left on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import transformers as T

from conftest import cli_in_process, VOCAB, cli_command, cli_env, make_tokenizer, run_cli, save_tiny, sentences
from gfprune_ray import load_pruned
from gfprune_ray.models import adapter_for

SMALL = ["--samples", "20", "--eval-samples", "10", "--seq-len", "16", "--batch-size", "4", "--latency-repeats", "1"]


def _digest(path: Path) -> str:
    """Of a file, or of every file of a folder (names and bytes)."""
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if file.is_file():
            digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Two tiny BERTs with the same shapes but different weights, 40 lines of text, and one
    successful prune (with a statistics file) that several tests inspect."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = make_tokenizer(root)
    ns = type("Workspace", (), {})()
    ns.root = root
    ns.model_a = save_tiny(root / "model_a", "bert", 0, tokenizer)
    ns.model_b = save_tiny(root / "model_b", "bert", 1, tokenizer)
    ns.data = root / "data.txt"
    ns.data.write_text("\n".join(sentences(40)) + "\n")
    ns.stats = root / "stats_a"
    ns.out = root / "pruned"
    ns.prune = run_cli("prune", ns.model_a, "--out", ns.out, "--data", ns.data, "--budget", "0.6", "--stats", ns.stats, *SMALL)
    return ns


def _model_outputs(model, tokenizer_folder: Path, texts: list[str]) -> torch.Tensor:
    tokenizer = T.AutoTokenizer.from_pretrained(tokenizer_folder)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    return hidden * enc["attention_mask"][..., None]


# ---- success -----------------------------------------------------------------------------------


def test_prune_writes_a_complete_output_folder(ws):
    assert ws.prune.returncode == 0, ws.prune.stderr[-3000:]
    assert "Traceback" not in ws.prune.stderr
    assert "saved to" in ws.prune.stdout
    out = ws.out
    for name in ("model.safetensors", "config.json", "gfprune.json", "tokenizer_config.json", "tokenizer.json"):
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
    assert not [p.name for p in ws.root.iterdir() if ".partial" in p.name]
    assert (ws.stats / "manifest.json").is_file()

    config = json.loads((out / "config.json").read_text())
    sizes = config["gfprune_sizes"]
    assert len(sizes) == 2 and all(len(s) == 2 for s in sizes)
    assert all(0 <= heads <= 4 and 0 <= ffn <= 48 for heads, ffn in sizes)
    assert sum(h for h, _ in sizes) < 8 or sum(f for _, f in sizes) < 96, "budget 0.6 must remove something"

    record = json.loads((out / "gfprune.json").read_text())
    assert record["options"]["method"] == "gfp"
    assert record["options"]["budget"] == 0.6
    assert record["options"]["reconstruction"] == "full"
    assert record["source"] == str(ws.model_a)
    assert record["stats_reused"] is False
    metrics = record["metrics"]
    assert metrics["kept_prunable_macs"] <= 0.6 + 1e-9
    assert 0 < metrics["macs_ratio"] < 1
    assert metrics["params"] < metrics["dense_params"]
    assert -1.0 <= metrics["fidelity"] <= 1.0 + 1e-6
    # the masks are the record of what was cut: they agree with the saved per-layer sizes
    masks = record["masks"]
    for layer, (heads, ffn) in enumerate(sizes):
        assert len(masks[f"{layer}.attn"]) == heads
        assert len(masks[f"{layer}.ffn"]) == ffn
        assert masks[f"{layer}.ffn"] == sorted(set(masks[f"{layer}.ffn"]))
    assert metrics["heads_kept"] == sum(h for h, _ in sizes)
    assert metrics["neurons_kept"] == sum(f for _, f in sizes)
    assert record["sizes"] == sizes

    model = load_pruned(out)
    assert type(model).__name__ == "BertModel"
    assert adapter_for(model).sizes() == sizes
    hidden = _model_outputs(model, out, sentences(3, seed=5))
    assert torch.isfinite(hidden).all()


def test_prune_reuses_its_statistics_file(ws, tmp_path):
    assert ws.prune.returncode == 0, ws.prune.stderr[-3000:]
    before = _digest(ws.stats)
    out = tmp_path / "again"
    result = run_cli("prune", ws.model_a, "--out", out, "--data", ws.data, "--budget", "0.6", "--stats", ws.stats, *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "gfprune.json").read_text())
    first = json.loads((ws.out / "gfprune.json").read_text())
    assert record["stats_reused"] is True
    assert record["stats_fingerprint"] == first["stats_fingerprint"]
    assert record["masks"] == first["masks"]
    assert _digest(ws.stats) == before


def test_eval_writes_eval_json(ws):
    assert ws.prune.returncode == 0, ws.prune.stderr[-3000:]
    result = run_cli("eval", ws.out, "--data", ws.data, *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((ws.out / "eval.json").read_text())
    assert report["dense"] == str(ws.model_a)
    metrics = report["metrics"]
    for key in ("fidelity", "macs", "dense_macs", "params", "dense_params", "ideal_speedup", "latency_b1_s"):
        assert key in metrics, key
    # same split and seed as the prune: the reloaded model must score what the pruned one scored
    pruned_metrics = json.loads((ws.out / "gfprune.json").read_text())["metrics"]
    assert metrics["fidelity"] == pytest.approx(pruned_metrics["fidelity"], abs=1e-5)
    assert metrics["macs"] == pruned_metrics["macs"]
    assert metrics["params"] == pruned_metrics["params"]


def test_prune_and_eval_measure_every_evaluation_corpus(ws, tmp_path):
    """--eval-data: per-corpus metrics, the calibration corpus's equal to the plain ones, each
    pinned against perplexity computed here on the examples the seeded split evaluates."""
    from gfprune_ray.data import read_examples, split_examples, tokenize
    from gfprune_ray.evaluate import perplexity

    gpt2 = save_tiny(tmp_path / "gpt2", "gpt2", 0, make_tokenizer(tmp_path))
    other = tmp_path / "other.txt"
    other.write_text("\n".join(sentences(30, seed=9)) + "\n")
    out = tmp_path / "pruned"
    # the calibration file repeated in --eval-data is measured once
    result = run_cli("prune", gpt2, "--out", out, "--data", ws.data, "--eval-data", f"{ws.data},{other}", "--budget", "0.5", *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "gfprune.json").read_text())
    assert record["calibration_corpus"] == "data" and record["eval_data"] == [str(other)]
    metrics = record["metrics"]
    assert sorted(k for k in metrics if k.startswith("relative_quality/")) == ["relative_quality/data", "relative_quality/other"]
    for key in ("relative_quality", "perplexity", "dense_perplexity"):
        assert metrics[f"{key}/data"] == metrics[key], key

    dense = T.AutoModelForCausalLM.from_pretrained(gpt2).eval()
    pruned = load_pruned(out).eval()
    tokenizer = T.AutoTokenizer.from_pretrained(gpt2)
    ppl = {}
    for label, source in (("data", ws.data), ("other", other)):
        evaluation = split_examples(read_examples(str(source)), 20, 10, 0)[1]  # SMALL's samples, eval-samples, seed
        batches = tokenize(tokenizer, evaluation.texts, 16, 4)
        ppl[label] = perplexity(dense, batches), perplexity(pruned, batches)
        assert metrics[f"dense_perplexity/{label}"] == pytest.approx(ppl[label][0], rel=1e-5), label
        assert metrics[f"perplexity/{label}"] == pytest.approx(ppl[label][1], rel=1e-5), label
        assert metrics[f"relative_quality/{label}"] == pytest.approx(ppl[label][0] / ppl[label][1], rel=1e-5), label
    assert abs(ppl["data"][0] - ppl["other"][0]) > 1e-3 * ppl["data"][0], "the corpora must be told apart"

    # eval without options measures the recorded corpora again; latency where and as asked
    again = run_cli("eval", out, "--latency-repeats", "3", "--latency-batch-sizes", "2,3", "--latency-seq-len", "8")
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["eval_data"] == [str(other)] and report["calibration_corpus"] == "data"
    timed = report["metrics"]
    assert timed["latency_seq_len"] == 8 and timed["latency_threads"] == 1 and not [k for k in timed if k.startswith("latency_b1_")]
    for b in (2, 3):
        assert timed[f"latency_b{b}_rounds"] >= 3 and f"speedup_b{b}_spread" in timed and 0 < timed[f"latency_b{b}_cpu_share"] < 1.5
    for key in ("relative_quality/data", "relative_quality/other", "perplexity/other", "relative_quality"):
        assert report["metrics"][key] == pytest.approx(metrics[key], rel=1e-5), key


# ---- help --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--help"], ["prune", "eval", "Prune MODEL to a MACs budget", "Measure a pruned model"]),
        (["prune", "--help"], ["model", "--out", "--data", "--eval-data", "--budget", "--method", "--reconstruct", "--allocation",
                               "--samples", "--eval-samples", "--seq-len", "--batch-size", "--seed", "--stats", "--force", "--shot-step", "llm-surgeon",
                               "--steps", "--checkpoint-every", "cofi or flop", "about 10000",
                               "Fraction of the prunable MACs to keep", "full, scale or none", "gfp, gfp-r2", "pydoc"]),
        (["eval", "--help"], ["path", "--data", "--eval-data", "--dense", "--eval-samples", "--samples", "--seq-len", "--seed",
                              "A folder written by", "Dense model to compare with"]),
    ],
    ids=["app", "prune", "eval"],
)
def test_help(args, expected):
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout
    text = " ".join(result.stdout.split())  # undo line wrapping
    for word in expected:
        assert word.lower() in text.lower(), f"{word!r} not in `{' '.join(args)}` output"


# ---- bad input ---------------------------------------------------------------------------------


def _write(path: Path, content: bytes | str) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


# each case: (arguments after `prune MODEL --out OUT`, as a function of (ws, tmp_path)), model, words the error must name
BAD = {
    "missing-model": (lambda ws, t: [], lambda ws, t: t / "no_such_model", lambda ws, t: ["no_such_model"]),
    "empty-data": (lambda ws, t: ["--data", _write(t / "empty.txt", "\n  \n\n")], None, lambda ws, t: ["empty.txt"]),
    "non-utf8-data": (lambda ws, t: ["--data", _write(t / "latin1.txt", "caf\xe9 w1 w2\n".encode("latin-1"))], None,
                      lambda ws, t: ["latin1.txt", "UTF-8"]),
    "missing-data": (lambda ws, t: ["--data", t / "nowhere.txt"], None, lambda ws, t: ["nowhere.txt"]),
    "budget-0": (lambda ws, t: ["--budget", "0"], None, lambda ws, t: ["budget", "0"]),
    "budget-1.5": (lambda ws, t: ["--budget", "1.5"], None, lambda ws, t: ["budget", "1.5"]),
    "budget-negative": (lambda ws, t: ["--budget", "-1"], None, lambda ws, t: ["budget", "-1"]),
    "unknown-method": (lambda ws, t: ["--method", "astrology"], None, lambda ws, t: ["method", "astrology"]),
    "unknown-reconstruction": (lambda ws, t: ["--reconstruct", "guess"], None, lambda ws, t: ["reconstruction", "guess"]),
    "foreign-stats": (lambda ws, t: ["--stats", ws.stats], lambda ws, t: ws.model_b, lambda ws, t: [ws.stats.name, "fingerprint"]),
    "surgeon-shot-step-0": (lambda ws, t: ["--method", "llm-surgeon", "--shot-step", "0"], None, lambda ws, t: ["shot-step", "0"]),
    "surgeon-shot-step-2": (lambda ws, t: ["--method", "llm-surgeon", "--shot-step", "2"], None, lambda ws, t: ["shot-step", "2"]),
    "stats-memory-not-a-size": (lambda ws, t: ["--stats-memory", "lots"], None, lambda ws, t: ["--stats-memory", "lots"]),
    "surgeon-with-stats": (lambda ws, t: ["--method", "llm-surgeon", "--stats", t / "s"], None, lambda ws, t: ["--stats", "llm-surgeon"]),
    # evaluation corpora are read before the model: with a missing model too, the error names the corpus
    "missing-eval-data": (lambda ws, t: ["--eval-data", f"pydoc,{t / 'gone.txt'}"], lambda ws, t: t / "no_such_model", lambda ws, t: ["gone.txt"]),
    "unknown-eval-corpus": (lambda ws, t: ["--eval-data", "no-such-corpus"], lambda ws, t: t / "no_such_model", lambda ws, t: ["no-such-corpus"]),
    "jsonl-without-text": (lambda ws, t: ["--data", _write(t / "records.jsonl", '{"content": "w1 w2 w3"}\n{"content": "w4"}\n')], None,
                           lambda ws, t: ["records.jsonl", "text"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_cleanly(ws, tmp_path, case):
    if case == "foreign-stats":
        assert ws.prune.returncode == 0, ws.prune.stderr[-3000:]  # it needs the stats file of that run
    extra, model, names = BAD[case]
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    args = [*(extra(ws, work))]
    if "--data" not in args:
        args += ["--data", ws.data]
    stats_before = _digest(ws.stats)
    result = cli_in_process("prune", model(ws, work) if model else ws.model_a, "--out", out, *args, *SMALL)

    assert result.returncode == 2, f"exit {result.returncode}; stderr:\n{result.stderr[-3000:]}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr[-3000:]}"
    assert lines[0].startswith("error: ")
    for name in names(ws, work):
        assert name in lines[0], f"{name!r} not named in {lines[0]!r}"
    assert not out.exists(), "a failed run left its output folder"
    leftovers = sorted(p.name for p in work.iterdir() if p.name.startswith("."))
    assert not leftovers, f"a failed run left {leftovers}"
    assert _digest(ws.stats) == stats_before, "a refused statistics file must not be touched"


def test_existing_output_is_refused_without_force(ws, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = cli_in_process("prune", ws.model_a, "--out", out, "--data", ws.data, *SMALL)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: ") and str(out) in lines[0] and "--force" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_force_replaces_existing_output(ws, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("stale")
    result = run_cli("prune", ws.model_a, "--out", out, "--data", ws.data, "--force", "--reconstruct", "none", *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "old.txt").exists()
    assert json.loads((out / "gfprune.json").read_text())["options"]["reconstruction"] == "none"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_seq_len_beyond_the_model_fails_cleanly_and_leaves_no_new_folders(ws, tmp_path):
    out = tmp_path / "made" / "for" / "out"
    args = list(SMALL)
    args[args.index("--seq-len") + 1] = "100"  # the tiny BERT has 64 positions
    result = cli_in_process("prune", ws.model_a, "--out", out, "--data", ws.data, *args)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--seq-len 100" in lines[0] and "64" in lines[0], result.stderr[-3000:]
    assert not (tmp_path / "made").exists(), "folders created for a failed run must go with it"


def test_unsupported_architecture_is_a_one_line_error(ws, tmp_path):
    folder = tmp_path / "neox"
    config = T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)
    T.GPTNeoXForCausalLM(config).save_pretrained(folder)
    make_tokenizer(folder).save_pretrained(folder)
    out = tmp_path / "out"
    result = cli_in_process("prune", folder, "--out", out, "--data", ws.data, *SMALL)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "gpt_neox" in lines[0] and "unsupported" in lines[0], result.stderr[-3000:]
    assert not out.exists()


def test_eval_defaults_to_the_recorded_data_and_split(ws, tmp_path):
    """Without options, eval scores the examples prune held back, whatever the CLI defaults are."""
    assert ws.prune.returncode == 0, ws.prune.stderr[-3000:]
    copy = tmp_path / "pruned"
    copy.mkdir()
    for f in ws.out.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    result = run_cli("eval", copy, "--latency-repeats", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((copy / "eval.json").read_text())
    recorded = json.loads((copy / "gfprune.json").read_text())
    assert report["data"] == recorded["data"]
    for key in ("seed", "samples", "eval_samples", "seq_len", "batch_size"):
        assert report["options"][key] == recorded["options"][key], key
    assert report["metrics"]["fidelity"] == pytest.approx(recorded["metrics"]["fidelity"], abs=1e-5)


# ---- training methods: Ray Train, checkpoints, resume ------------------------------------------


def _cofi_args(ws, out: Path) -> list:
    return ["prune", ws.model_a, "--out", out, "--data", ws.data, "--budget", "0.6", "--method", "cofi",
            "--steps", "40", "--checkpoint-every", "10", *SMALL]  # 40 pruning + 10 fine-tuning steps


def test_prune_cofi_killed_during_training_resumes_to_the_uninterrupted_model(ws, tmp_path):
    whole = run_cli(*_cofi_args(ws, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    record = json.loads((tmp_path / "whole" / "gfprune.json").read_text())
    assert record["options"]["method"] == "cofi" and len(record["curve"]) == 40 + 10
    assert record["metrics"]["kept_prunable_macs"] <= 0.6 + 1e-9
    assert not (tmp_path / ".whole.train").exists(), "checkpoints are removed once the model is saved"

    storage = tmp_path / ".killed.train"
    proc = subprocess.Popen([*cli_command(), *map(str, _cofi_args(ws, tmp_path / "killed"))], env=cli_env(),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(storage.glob("*/checkpoint_*/training.json")):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its embedded Ray and the training worker
    proc.wait()
    checkpoints = list(storage.glob("*/checkpoint_*/training.json"))
    assert checkpoints and not (tmp_path / "killed").exists(), "the kill must land during training"
    steps_done = json.loads(checkpoints[0].read_text())["step"]
    assert 10 <= steps_done < 50

    resumed = run_cli(*_cofi_args(ws, tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = json.loads((tmp_path / "killed" / "gfprune.json").read_text())
    assert again["curve"] == record["curve"], "the resumed run continues exactly where the checkpoint left it"
    assert again["masks"] == record["masks"]
    a, b = load_pruned(tmp_path / "whole"), load_pruned(tmp_path / "killed")
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name


def test_stats_file_is_refused_for_a_training_method(ws, tmp_path):
    result = cli_in_process("prune", ws.model_a, "--out", tmp_path / "x", "--data", ws.data, "--method", "flop", "--stats", tmp_path / "s", *SMALL)
    assert result.returncode == 2 and "--stats does not apply to flop" in result.stderr

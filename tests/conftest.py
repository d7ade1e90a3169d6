"""Shared fixtures: tiny random models of every supported family, built from configs (no hub)."""

from __future__ import annotations

import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# huggingface_hub reads these when imported (by transformers, below): set later, tests that run
# the CLI in this process would wait ~25 s on hub retries for a name that is not a local corpus
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Set before torch is imported, so it holds for the CLI subprocesses too: `make test` runs two
# pytest workers on two cores, and a multi-threaded torch next to a busy process stalls (below).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers as T  # noqa: E402

# Ray workers of the farm tests share the cores with this process. Multi-threaded torch then
# stalls on its many tiny products (each parallel region waits for a descheduled thread): a test
# that takes seconds alone took over 5 minutes next to a busy process. One thread is plenty here.
torch.set_num_threads(1)


def pytest_runtest_logreport(report) -> None:
    """With GFPRUNE_TEST_TIMES=FILE, each test phase's seconds are appended to FILE as it ends
    (tab-separated: seconds, phase, test), so a suite stopped by a time limit still leaves them."""
    times = os.environ.get("GFPRUNE_TEST_TIMES")
    if times and not os.environ.get("PYTEST_XDIST_WORKER"):  # under xdist the controller writes each once
        with open(times, "a") as out:
            out.write(f"{report.duration:.2f}\t{report.when}\t{report.nodeid}\n")


VOCAB = 96
COMMON = dict(vocab_size=VOCAB, max_position_embeddings=64)


def _bert():
    return T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, **COMMON))


def _bert_cls():
    config = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, num_labels=3, **COMMON)
    return T.BertForSequenceClassification(config)


def _roberta():
    config = T.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                             vocab_size=VOCAB, max_position_embeddings=70, pad_token_id=1)
    return T.RobertaForSequenceClassification(config)


def _distilbert():
    return T.DistilBertModel(T.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=48, **COMMON))


def _gpt2():
    config = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=48, vocab_size=VOCAB, n_positions=64,
                          bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return T.GPT2LMHeadModel(config)


def _opt():
    config = T.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48, word_embed_proj_dim=32,
                         bos_token_id=0, eos_token_id=2, pad_token_id=1, **COMMON)
    return T.OPTForCausalLM(config)


def _llama():
    config = T.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=48, bos_token_id=0, eos_token_id=2, pad_token_id=1, **COMMON)
    return T.LlamaForCausalLM(config)


def _qwen2():
    config = T.Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=48, bos_token_id=0, eos_token_id=2, pad_token_id=1, **COMMON)
    return T.Qwen2ForCausalLM(config)


def _qwen3():
    config = T.Qwen3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           intermediate_size=48, bos_token_id=0, eos_token_id=2, pad_token_id=1, **COMMON)
    return T.Qwen3ForCausalLM(config)


def _mistral():
    config = T.MistralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                             intermediate_size=48, bos_token_id=0, eos_token_id=2, pad_token_id=1, sliding_window=None, **COMMON)
    return T.MistralForCausalLM(config)


def _mpnet():
    return T.MPNetModel(T.MPNetConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, **COMMON))


TINY = {
    "bert": _bert,
    "bert-cls": _bert_cls,
    "roberta-cls": _roberta,
    "distilbert": _distilbert,
    "gpt2": _gpt2,
    "opt": _opt,
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "mistral": _mistral,
    "mpnet": _mpnet,
}


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = TINY[name]()
    # random init leaves biases at zero; give them values so that bias handling is exercised
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.02)
    return model.eval()


def tiny_batches(n_batches: int = 3, batch: int = 4, seq: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random token batches with some right padding, so that padding masks matter."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
        lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask + (1 - mask), "attention_mask": mask})
    return out


@pytest.fixture(params=sorted(TINY))
def family(request) -> str:
    return request.param


# ---- models on disk with a tokenizer, and the command line ---------------------------------

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIALS))]


def make_tokenizer(folder: Path):
    """A WordPiece tokenizer whose ids cover exactly the tiny models' vocabulary."""
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIALS + WORDS) + "\n")
    # transformers 5 builds the tokenizer from `vocab`; the old `vocab_file=` keyword is silently ignored
    tokenizer = T.BertTokenizerFast(vocab=str(vocab))
    assert len(tokenizer) == VOCAB, "the tokenizer must cover exactly the tiny model's vocabulary"
    assert tokenizer.convert_tokens_to_ids("w7") == len(SPECIALS) + 7
    return tokenizer


def save_tiny(folder: Path, family: str, seed: int, tokenizer) -> Path:
    tiny_model(family, seed=seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) for _ in range(n)]


def cli_command() -> list[str]:
    script = Path(sys.executable).parent / "gfprune-ray"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gfprune_ray.cli"]


CLI_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200", "NO_COLOR": "1"}


def cli_env(**extra: str) -> dict:
    return dict(os.environ, **CLI_ENV, **extra)


def cli_in_process(*args, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """The CLI run in this process, for commands that must stop in one line before any work: a
    subprocess spends seconds importing torch, Ray and MLflow to print that line, and the
    suite has dozens of them. An exception the CLI lets escape shows on stderr as a traceback,
    exit code 1, as it would from the console script."""
    import contextlib
    import traceback

    from typer.testing import CliRunner

    from gfprune_ray.cli import app

    with contextlib.chdir(cwd or Path.cwd()):
        result = CliRunner().invoke(app, [str(a) for a in args], env={**CLI_ENV, **env}, prog_name="gfprune-ray")
    stderr, code = result.stderr, result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
        code = 1
    return subprocess.CompletedProcess(args, code, result.stdout, stderr)


def run_cli(*args, cwd: Path | None = None, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*cli_command(), *map(str, args)], capture_output=True, text=True, env=cli_env(**env), cwd=cwd, timeout=timeout)


def legal_head_mask(mask: torch.Tensor, group: int) -> torch.Tensor:
    """A head mask that grouped-query attention can run, from any mask: every kept K/V group keeps
    its first k kept heads, k the fewest any kept group keeps. Keeps only heads `mask` keeps, and
    at least one if it keeps any."""
    per_group = mask.reshape(-1, group)
    counts = per_group.sum(1)
    if not counts.any():
        return mask.clone()
    k = int(counts[counts > 0].min())
    return (per_group & (per_group.cumsum(1) <= k)).reshape(-1)


@pytest.fixture(scope="module")
def local_ray():
    """A fresh embedded Ray for one test module (address="local": even if a `ray start --head`
    cluster runs on this machine), with the farm's Ray Data settings."""
    import ray

    from gfprune_ray.farm import stages as farm

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024**2, logging_level=logging.WARNING, log_to_driver=False)
    farm.quiet_ray_data()
    yield
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayNode:
    """A node started by start_ray_node: its `ray start --block` process, and the head's own
    temporary folder."""

    process: subprocess.Popen
    temp_dir: Path | None


def start_ray_node(*args: str, log: Path, env: dict, timeout: float = 120) -> RayNode | None:
    """`ray start ARGS --block` in the background, returned once its node is up; None if it exits
    first (the reason is in LOG). Stop it with stop_ray_node: unlike `ray stop`, that ends this
    node's processes only, not every Ray on the machine (a developer's own cluster, the embedded
    Ray of the other pytest worker). A head gets its own temporary folder: in the shared
    /tmp/ray, a job's working-directory package was once looked up in another cluster's session."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp")) if "--head" in args else None  # short: it holds Unix sockets
    # the dashboard agent's port is fixed (52365) unless given: a second node on this machine
    # would lose it, and with it the job API
    extra = [f"--dashboard-agent-listen-port={free_port()}"] + ([f"--temp-dir={temp_dir}"] if temp_dir else [])
    ray_bin = Path(sys.executable).parent / "ray"
    with open(log, "w") as out:
        # no drain on SIGTERM: it serves traffic handover (Ray Serve) and waits up to 30 s
        process = subprocess.Popen([str(ray_bin), "start", *args, *extra, "--block"], stdout=out, stderr=subprocess.STDOUT,
                                   env=dict(env, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0"))
    node = RayNode(process, temp_dir)
    deadline = time.monotonic() + timeout
    while "Ray runtime started." not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_ray_node(node)
            return None
        time.sleep(0.2)
    return node


def stop_ray_node(node: RayNode | None) -> None:
    """SIGTERM makes `ray start --block` stop the processes of its own node, then exit."""
    if node is None:
        return
    if node.process.poll() is None:
        node.process.terminate()
        try:
            node.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait()
    if node.temp_dir:
        shutil.rmtree(node.temp_dir, ignore_errors=True)

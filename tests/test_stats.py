"""Statistics: sums over shards equal sums over all data, padding is ignored, files are safe."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from safetensors.torch import save_file

from conftest import COMMON, tiny_batches, tiny_model
from gfprune_ray.errors import UserError
from gfprune_ray.models import adapter_for
from gfprune_ray.stats import (
    GramStats,
    ModelStats,
    collect_split,
    collect_stats,
    stats_fingerprint,
    weights_fingerprint,
)
from gfprune_ray.stats_store import StreamedGram, load_stats, read_safetensors, save_stats, site_reader


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b).clamp(min=1e-300))


def _assert_stats_close(got: ModelStats, want: ModelStats, tol: float) -> None:
    assert got.sites.keys() == want.sites.keys()
    for key in want.sites:
        g, w = got[key], want[key]
        assert g.gram.dtype == torch.float64 and g.total.dtype == torch.float64
        assert float(g.n) == float(w.n), key
        assert _rel(g.gram, w.gram) < tol, (key, _rel(g.gram, w.gram))
        assert _rel(g.total, w.total) < tol, (key, _rel(g.total, w.total))


@pytest.mark.parametrize("name", ["bert", "llama", "gpt2", "opt"])
def test_shard_sums_equal_sum_over_all_data(name):
    adapter = adapter_for(tiny_model(name))
    batches = tiny_batches(n_batches=5, seed=1)
    whole = collect_stats(adapter, batches)
    for k in (1, 3):
        merged = collect_stats(adapter, batches[:k]) + collect_stats(adapter, batches[k:])
        _assert_stats_close(merged, whole, 1e-6)
    # reducing many one-batch shards (the farm's tree reduction) gives the same result
    shards = [collect_stats(adapter, [b]) for b in batches]
    total = shards[0]
    for shard in shards[1:]:
        total = total + shard
    _assert_stats_close(total, whole, 1e-6)
    # the statistics are not trivially zero: the test would not pass by accident
    for s in whole.sites.values():
        assert float(s.gram.diagonal().sum()) > 0


@pytest.mark.parametrize("name", ["bert", "opt"])
def test_heldout_rows_go_to_their_own_statistics_in_the_same_pass(name):
    adapter = adapter_for(tiny_model(name))
    batches = tiny_batches(n_batches=2, seed=4)
    flags = [torch.tensor([True, False, False, True]), torch.tensor([False, False, False, False])]
    fit, held = collect_split(adapter, [b | {"heldout": f} for b, f in zip(batches, flags)])
    rows = lambda keep: [{k: v[m] for k, v in b.items()} for b, f in zip(batches, flags) for m in [f == keep] if m.any()]
    _assert_stats_close(fit, collect_stats(adapter, rows(False)), 1e-6)
    _assert_stats_close(held, collect_stats(adapter, rows(True)), 1e-6)


@pytest.mark.parametrize("name", ["bert", "distilbert", "gpt2", "opt", "llama"])
def test_padding_is_excluded(name):
    adapter = adapter_for(tiny_model(name))
    batches = tiny_batches(n_batches=2, seed=2)
    stats = collect_stats(adapter, batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    padded_positions = sum(int((b["attention_mask"] == 0).sum()) for b in batches)
    assert padded_positions > 0  # the fixture does pad, so this checks something
    for s in stats.sites.values():
        assert int(s.n) == tokens
    assert stats.tokens == tokens

    # the same batches with 5 more padding positions at the end of every row
    extra = 5
    longer = []
    for b in batches:
        rows = b["input_ids"].shape[0]
        longer.append({
            "input_ids": torch.cat([b["input_ids"], torch.ones(rows, extra, dtype=b["input_ids"].dtype)], 1),
            "attention_mask": torch.cat([b["attention_mask"], torch.zeros(rows, extra, dtype=b["attention_mask"].dtype)], 1),
        })
    # float matmuls of other shapes may round differently, hence a tolerance instead of equality
    _assert_stats_close(collect_stats(adapter, longer), stats, 1e-5)


@pytest.mark.parametrize("width", [7, 700])
def test_gram_stats_match_direct_sums(width):
    """GramStats.add_ is sum x x^T, sum x and a count, whatever the batch split; 700 columns are
    accumulated in 8 blocks of rows (the last one partial) and mirrored below the diagonal."""
    g = torch.Generator().manual_seed(width)
    x = torch.randn(50, width, generator=g) + torch.linspace(-1, 1, width)  # columns with different means
    s = GramStats.zeros(width)
    s.add_(x[:5])
    s.add_(x[5:20])
    s.add_(x[20:])
    x64 = x.to(torch.float64)
    assert int(s.n) == 50
    assert _rel(s.gram, x64.T @ x64) < 1e-6
    assert _rel(s.gram, s.gram.T) < 1e-7
    assert _rel(s.total, x64.sum(0)) < 1e-6
    assert _rel(s.mean, x64.mean(0)) < 1e-6
    assert _rel(s.second_moment, x64.T @ x64 / 50) < 1e-6


# ---- files -----------------------------------------------------------------------------------


def _stats_pair(name="bert"):
    model = tiny_model(name)
    adapter = adapter_for(model)
    batches = tiny_batches(n_batches=3)
    fp = stats_fingerprint(weights_fingerprint(model), "data-fp", 12, 3)
    fit = collect_stats(adapter, batches[:2])
    heldout = collect_stats(adapter, batches[2:])
    for part in (fit, heldout):
        part.fingerprint = fp
        part.meta = {"seq_len": 10.25, "samples": 3}
    return adapter, fp, {"fit": fit, "heldout": heldout}


def test_save_load_round_trip_is_exact(tmp_path):
    adapter, fp, parts = _stats_pair()
    path = tmp_path / "stats"
    save_stats(parts, path)
    assert not list(path.glob("*.tmp")) and len(list(path.glob("site-*.safetensors"))) == len(parts["fit"].sites)
    loaded = load_stats(path, fp, adapter)
    assert loaded.keys() == parts.keys()
    for name, part in parts.items():
        got = loaded[name]
        assert got.fingerprint == fp
        assert got.meta == part.meta
        assert got.sites.keys() == part.sites.keys()
        for key, s in part.sites.items():
            t = got[key]
            for field in ("n", "gram", "total"):
                a, b = getattr(t, field), getattr(s, field)
                assert a.shape == b.shape and a.dtype == b.dtype, (key, field)
                assert torch.equal(a, b), (key, field)
    # loaded statistics still add up (the farm merges cached parts with new shards)
    merged = loaded["fit"] + loaded["heldout"]
    assert torch.equal(merged[(0, "ffn")].gram, parts["fit"][(0, "ffn")].gram + parts["heldout"][(0, "ffn")].gram)


@pytest.mark.parametrize("rows", [1, 3, 1000])
def test_a_stored_gram_streamed_by_rows_is_the_stored_gram(tmp_path, rows):
    """The refit reads a stored site's Gram a block of rows at a time (never whole): the blocks,
    in order, are the saved Gram bit for bit, as GramStats.row_blocks gives an in-memory one."""
    adapter, fp, parts = _stats_pair()
    save_stats(parts, tmp_path / "stats")
    for name, part in parts.items():
        for site, stats in part.sites.items():
            streamed = site_reader(load_stats(tmp_path / "stats", fp)[name].sites, site, by_rows=True)()
            assert isinstance(streamed, StreamedGram)
            assert torch.equal(streamed.n, stats.n) and torch.equal(streamed.total, stats.total) and torch.equal(streamed.mean, stats.mean)
            blocks = list(streamed.row_blocks(rows))
            assert [start for start, _ in blocks] == list(range(0, stats.gram.shape[0], rows))
            assert torch.equal(torch.cat([block for _, block in blocks]), stats.gram)
            for (a, x), (b, y) in zip(blocks, stats.row_blocks(rows), strict=True):
                assert a == b and torch.equal(x, y)


def test_plain_reader_reads_what_the_safetensors_library_writes(tmp_path):
    # statistics are read without a memory map (issue 15's resident peak); the library is the
    # independent writer here, with shapes and dtypes the store uses and a few it does not
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    tensors = {"fit/gram": torch.randn(7, 7, generator=g, dtype=torch.float64), "fit/n": torch.tensor([5.0], dtype=torch.float64),
               "grads/total": torch.randn(3, generator=g), "empty": torch.zeros(0, 4, dtype=torch.float64)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"fingerprint": "abc"})
    meta, got = read_safetensors(tmp_path / "x.safetensors", lambda name: name != "grads/total")
    assert meta == {"fingerprint": "abc"} and sorted(got) == ["empty", "fit/gram", "fit/n"]
    for name, tensor in got.items():
        assert tensor.dtype == tensors[name].dtype and torch.equal(tensor, tensors[name]), name


def test_wrong_fingerprint_is_refused_naming_the_file(tmp_path):
    adapter, fp, parts = _stats_pair()
    path = tmp_path / "cached-stats"
    save_stats(parts, path)
    other = stats_fingerprint("another-model", "data-fp", 12, 3)
    with pytest.raises(UserError) as info:
        load_stats(path, other, adapter)
    assert str(path) in str(info.value)


def _bert_like(**overrides):
    torch.manual_seed(0)
    args = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, **COMMON)
    args.update(overrides)
    return T.BertModel(T.BertConfig(**args)).eval()


@pytest.mark.parametrize("overrides", [{"intermediate_size": 64}, {"num_hidden_layers": 3}, {"hidden_size": 48}])
def test_stats_of_another_model_are_refused(tmp_path, overrides):
    adapter, fp, parts = _stats_pair("bert")
    path = tmp_path / "stats"
    save_stats(parts, path)
    other = adapter_for(_bert_like(**overrides))
    with pytest.raises(UserError) as info:
        load_stats(path, None, other)  # no fingerprint check: the shapes alone must refuse it
    assert str(path) in str(info.value)
    # the model the statistics belong to is accepted by the same check
    assert load_stats(path, None, adapter_for(_bert_like())).keys() == {"fit", "heldout"}


def test_non_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "stats.safetensors"
    path.write_text("this is not a safetensors file\n")
    with pytest.raises(UserError) as info:
        load_stats(path, "0123456789abcdef")
    assert str(path) in str(info.value)
    pickled = tmp_path / "stats.pt"
    torch.save({"gram": torch.eye(3)}, pickled)
    with pytest.raises(UserError):
        load_stats(pickled, None)
    with pytest.raises(UserError):
        load_stats(tmp_path / "missing.safetensors", None)


def test_foreign_safetensors_file_is_refused_without_fingerprint(tmp_path):
    model = tiny_model("bert")
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(UserError):
        load_stats(path, None, adapter_for(model))


def test_foreign_safetensors_file_is_refused_by_fingerprint(tmp_path):
    model = tiny_model("bert")
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(UserError) as info:
        load_stats(path, "0123456789abcdef", adapter_for(model))
    assert str(path) in str(info.value)


# ---- fingerprints ----------------------------------------------------------------------------


def test_weights_fingerprint_follows_every_weight():
    model = tiny_model("llama")
    base = weights_fingerprint(model)
    assert base == weights_fingerprint(tiny_model("llama"))  # deterministic for equal weights
    assert base != weights_fingerprint(tiny_model("llama", seed=1))
    weight = model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        old = weight[3, 5].item()
        weight[3, 5] += 1e-3
    changed = weights_fingerprint(model)
    assert changed != base
    with torch.no_grad():
        weight[3, 5] = old
    assert weights_fingerprint(model) == base


def test_stats_fingerprint_follows_model_data_seq_len_and_samples():
    base = stats_fingerprint("model", "data", 128, 512)
    assert base == stats_fingerprint("model", "data", 128, 512)
    variants = [
        stats_fingerprint("model", "data", 256, 512),
        stats_fingerprint("model", "data", 128, 1024),
        stats_fingerprint("model2", "data", 128, 512),
        stats_fingerprint("model", "data2", 128, 512),
    ]
    assert all(v != base for v in variants)
    assert len(set(variants)) == len(variants)


def test_adding_statistics_of_different_fingerprints_is_refused():
    adapter = adapter_for(tiny_model("bert"))
    a = collect_stats(adapter, tiny_batches(1))
    b = collect_stats(adapter, tiny_batches(1, seed=3))
    a.fingerprint, b.fingerprint = "aaaa", "bbbb"
    with pytest.raises(ValueError):
        a + b

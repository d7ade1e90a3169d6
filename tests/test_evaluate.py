"""Quality metrics against independent computations: accuracy, perplexity, fidelity."""

from __future__ import annotations

import math

import torch

from conftest import tiny_batches, tiny_model
from gfprune_ray.evaluate import QualityReference, count_params, perplexity
from gfprune_ray.models import adapter_for


def test_accuracy_with_a_classification_head_and_labels():
    model = tiny_model("bert-cls")
    batches = tiny_batches(n_batches=2, batch=5)
    with torch.inference_mode():
        predictions = torch.cat([model(**b).logits.argmax(-1) for b in batches])
    labels = predictions.tolist()
    labels[0] = (labels[0] + 1) % 3  # exactly one wrong out of ten
    reference = QualityReference(model, adapter_for(model), batches, labels)
    result = reference.measure(model)
    assert result["accuracy"] == result["dense_accuracy"] == 0.9
    assert abs(result["fidelity"] - 1.0) < 1e-6  # the dense model against itself


def test_perplexity_matches_the_models_own_loss():
    model = tiny_model("gpt2")
    ids = torch.randint(3, 90, (1, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode():
        loss = model(**batch, labels=ids).loss
    assert math.isclose(perplexity(model, [batch]), math.exp(float(loss)), rel_tol=1e-5)


def test_perplexity_ignores_padding():
    model = tiny_model("llama")
    ids = torch.randint(3, 90, (1, 10), generator=torch.Generator().manual_seed(1))
    plain = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    padded = {"input_ids": torch.cat([ids, torch.ones(1, 4, dtype=torch.long)], 1),
              "attention_mask": torch.cat([torch.ones_like(ids), torch.zeros(1, 4, dtype=torch.long)], 1)}
    assert math.isclose(perplexity(model, [plain]), perplexity(model, [padded]), rel_tol=1e-4)


def test_count_params_counts_tied_weights_once():
    model = tiny_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    assert count_params(model) == sum(p.numel() for p in model.parameters())  # parameters() dedupes too
    assert count_params(model) < sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))


def test_corpus_references_report_each_corpus_and_the_calibration_one_plainly():
    from gfprune_ray.evaluate import CorpusReferences

    dense = tiny_model("gpt2")
    pruned = tiny_model("gpt2", seed=1)  # any other model of the same shape
    corpora = {"calib": (tiny_batches(n_batches=2, batch=3, seed=0), None), "other": (tiny_batches(n_batches=1, batch=4, seed=1), None)}
    refs = CorpusReferences.build(dense, adapter_for(dense), corpora, "calib")
    assert len(refs) == 3
    result = refs.measure(pruned)
    for label, (batches, _) in corpora.items():
        want_dense, want = perplexity(dense, batches), perplexity(pruned, batches)
        assert math.isclose(result[f"dense_perplexity/{label}"], want_dense, rel_tol=1e-6)
        assert math.isclose(result[f"perplexity/{label}"], want, rel_tol=1e-6)
        assert math.isclose(result[f"relative_quality/{label}"], want_dense / want, rel_tol=1e-6)
    assert result["quality_metric"] == "perplexity" and "quality_metric/calib" not in result
    for key in ("perplexity", "dense_perplexity", "relative_quality"):
        assert result[key] == result[f"{key}/calib"] != result[f"{key}/other"]


def test_fidelity_is_the_mean_cosine_of_mean_pooled_embeddings_of_two_different_models():
    """Fidelity of one model against ANOTHER, pinned to a per-example computation from its
    definition: mean over examples of cos(mean over non-padding tokens of h_dense, the same of
    h_other). Unnormalised pooling, pooling over padding or a missing normalisation changes it."""
    dense, other = tiny_model("bert", seed=0), tiny_model("bert", seed=1)
    batches = tiny_batches(n_batches=2, batch=4, seq=12, seed=3)  # rows have different padding
    expected = []
    with torch.inference_mode():
        for batch in batches:
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                n = int(mask.sum())
                row = {"input_ids": ids[None, :n], "attention_mask": mask[None, :n]}  # no padding at all
                a = dense(**row).last_hidden_state[0].mean(0)
                b = other(**row).last_hidden_state[0].mean(0)
                expected.append(float(a @ b / (a.norm() * b.norm())))
    value = QualityReference(dense, adapter_for(dense), batches).measure(other)["fidelity"]
    assert 0.05 < abs(value) < 0.95  # not a trivial case: the models really differ
    assert math.isclose(value, sum(expected) / len(expected), abs_tol=1e-5)


def test_efficiency_without_repeats_counts_but_does_not_time():
    from gfprune_ray.evaluate import efficiency
    from gfprune_ray.latency import LatencySettings

    dense = tiny_model("bert")
    smaller = type(dense)(dense.config.__class__(**{**dense.config.to_dict(), "num_hidden_layers": 1})).eval()
    result = efficiency(adapter_for(dense), adapter_for(smaller), LatencySettings(repeats=0, seq_len=16))
    assert not [k for k in result if "latency_b" in k or k.startswith("speedup")], sorted(result)
    assert math.isclose(result["ideal_speedup"], result["dense_macs"] / result["macs"]) and result["ideal_speedup"] > 1.5

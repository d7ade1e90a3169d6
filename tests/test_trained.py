"""CoFi and FLOP: hard-concrete gates, the Lagrangian, factorized layers, checkpoints, surgery."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import tiny_batches, tiny_model
from gfprune_ray.data import with_labels
from gfprune_ray.flops import counted_macs, model_macs, prunable_macs
from gfprune_ray.gates import HardConcreteGates, target_at
from gfprune_ray.methods.cofi import CoFiStudent, _block_key, _gate_macs, _unit_key
from gfprune_ray.methods.flop import FlopStudent, GatedFactorized, _key
from gfprune_ray.methods.trained import kept_fraction, student_for
from gfprune_ray.models import adapter_for
from gfprune_ray.models import layers as L
from gfprune_ray.surgery import load_pruned, save_pruned
from gfprune_ray.training import GatedTraining, Schedule, run_training

SEQ = 12.0


def _randomize(student, seed: int = 0, shift: float = 0.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gates in student.gates.values():
            gates.log_alpha.copy_(torch.randn(gates.log_alpha.shape, generator=g) * 2 + shift)


def test_keep_probability_is_the_frequency_of_nonzero_draws():
    gates = HardConcreteGates(5)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor([-4.0, -1.0, 0.0, 1.0, 4.0]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([gates.sample(g) for _ in range(20000)])
    assert draws.min() >= 0 and draws.max() <= 1
    assert (draws == 0).any() and (draws == 1).any()  # the stretch puts mass on both ends
    assert torch.allclose((draws != 0).float().mean(0), gates.keep_probability().detach(), atol=0.015)


@pytest.mark.parametrize("method,name", [("cofi", "bert"), ("cofi", "llama"), ("flop", "gpt2"), ("flop", "bert")])  # llama: hidden gates too
def test_expected_kept_macs_match_a_monte_carlo_estimate(method, name):
    adapter = adapter_for(tiny_model(name))
    geoms = adapter.geometries()
    student = student_for(method, adapter, SEQ)
    _randomize(student)
    g = torch.Generator().manual_seed(1)
    draws = []
    with torch.no_grad():
        for _ in range(4000):
            on = {k: gates.sample(g) != 0 for k, gates in student.gates.items()}
            if method == "cofi":
                width = {"d": int(on["hidden"].sum())} if "hidden" in on else {}
                kept = sum(float(on[_block_key(s)][0]) * int(on[_unit_key(s)].sum()) * _gate_macs(replace(geoms[s[0]], **width), s[1], SEQ) for s in student.sites)
            else:
                kept = student.score_macs + sum(int(on[_key(p)].sum()) * sum(layer.shape) for p, layer in student.layers.items())
            draws.append(kept / prunable_macs(geoms, SEQ))
    draws = torch.tensor(draws)
    expected = float(student.expected_kept().detach())
    assert abs(float(draws.mean()) - expected) < 4 * float(draws.std()) / math.sqrt(len(draws)) + 1e-9


def test_target_ramps_from_the_start_to_the_budget_then_holds():
    targets = [target_at(s, 10, 0.5, warmup=0.5, start=1.2) for s in range(10)]
    assert targets[0] < 1.2 and targets[4] == pytest.approx(0.5) and targets[-1] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(targets, targets[1:]))


@pytest.mark.parametrize("method,name,budget", [("cofi", "bert", 0.6), ("cofi", "gpt2", 0.5), ("flop", "gpt2", 0.7), ("flop", "bert", 0.8)])
def test_a_short_run_lands_on_the_budget(method, name, budget):
    adapter = adapter_for(tiny_model(name))
    geoms = adapter.geometries()
    training = run_training(GatedTraining(student_for(method, adapter, SEQ), Schedule(steps=200, budget=budget)), tiny_batches(4))
    assert len(training.curve) == 250  # 200 steps of pruning, 50 of fine-tuning
    assert training.curve[199]["expected_kept"] == pytest.approx(budget, abs=0.03)  # the Lagrangian got it there
    training.student.finish(budget)
    kept = kept_fraction(adapter, geoms, SEQ)
    assert budget - 0.1 <= kept <= budget + 1e-9
    adapter.model(input_ids=tiny_batches(1)[0]["input_ids"])  # the cut model runs


@pytest.mark.parametrize("conv", [False, True])
def test_flop_layer_with_all_gates_open_is_the_original_and_dropping_zero_gates_changes_nothing(conv):
    torch.manual_seed(0)
    original = Conv1D(12, 20) if conv else nn.Linear(20, 12)
    with torch.no_grad():
        original.bias.normal_()
    x = torch.randn(3, 5, 20, dtype=torch.float32)
    layer = GatedFactorized(original)
    assert torch.allclose(layer(x), original(x), atol=1e-5)
    layer.z = torch.ones(layer.rank)
    assert torch.allclose(layer(x), original(x), atol=1e-5)
    for keep in (3, 9):  # thin: 3 * (20 + 12) < 240; nearly full rank: one dense layer is cheaper
        z = torch.zeros(layer.rank)
        z[torch.randperm(layer.rank)[:keep]] = torch.rand(keep) + 0.1
        layer.z = z
        gated = layer(x)
        deployed = layer.thin(z)
        assert isinstance(deployed, L.FactorizedLinear) == (keep * 32 < 240)
        assert torch.allclose(deployed(x), gated, atol=1e-5)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_flop_model_saves_loads_with_one_call_and_its_macs_are_counted_right(name, tmp_path):
    adapter = adapter_for(tiny_model(name))
    student = FlopStudent(adapter, SEQ)
    _randomize(student, seed=3, shift=-2.0)  # low ranks: most layers deploy as two thin ones
    ids = tiny_batches(1)[0]["input_ids"]
    with torch.no_grad(), student.applied(student.final_gates(1.0)):
        gated = adapter.model(input_ids=ids)[0]
    student.finish(1.0)
    assert any(isinstance(m, L.FactorizedLinear) for m in adapter.model.modules())
    with torch.no_grad():
        assert torch.allclose(adapter.model(input_ids=ids)[0], gated, atol=1e-4)
    save_pruned(adapter.model, tmp_path)
    loaded = load_pruned(tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids)[0], gated, atol=1e-4)
    seq = ids.shape[1]
    assert model_macs(adapter_for(loaded), seq) == pytest.approx(counted_macs(loaded, ids[:1]), rel=1e-6)


def _same_state(a: GatedTraining, b: GatedTraining) -> None:
    for (name, p), (_, q) in zip(a.student.state_dict().items(), b.student.state_dict().items()):
        assert torch.equal(p, q), name
    assert a.curve == b.curve and a.step == b.step
    for name in a.optimizers:
        sa, sb = a.optimizers[name].state_dict()["state"], b.optimizers[name].state_dict()["state"]
        assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


@pytest.mark.parametrize("method", ["cofi", "flop"])
def test_training_resumes_from_a_checkpoint_to_the_same_state(method, tmp_path):
    batches = tiny_batches(3)
    schedule = Schedule(steps=6, budget=0.6, finetune=1 / 3, checkpoint_every=3)
    assert schedule.total_steps == 8  # the checkpoint at step 6 resumes into the fine-tuning phase

    def fresh() -> GatedTraining:
        return GatedTraining(student_for(method, adapter_for(tiny_model("gpt2")), SEQ), schedule)

    saved = []
    whole = run_training(fresh(), batches, checkpoint=lambda t: (t.save(tmp_path / f"s{t.step}"), saved.append(t.step)))
    assert saved == [3, 6]
    for step in saved:
        resumed = fresh()
        resumed.load(tmp_path / f"s{step}")
        assert resumed.step == step
        run_training(resumed, batches)
        _same_state(whole, resumed)


@pytest.mark.parametrize("method,name", [("cofi", "gpt2"), ("flop", "bert")])  # gpt2: hidden gates too
def test_fine_tuning_trains_the_deployed_model_and_leaves_the_gates_alone(method, name):
    adapter = adapter_for(tiny_model(name))
    batches = tiny_batches(2)
    training = GatedTraining(student_for(method, adapter, SEQ), Schedule(steps=5, budget=0.6, finetune=1.0))
    student = training.student.to("cpu")  # as a Ray Train worker moves it: nn.Module.to must still work
    for step in range(5):
        training.train_step(batches[step % 2])
    gates = copy.deepcopy(student.gates.state_dict()) | copy.deepcopy(student.lagrangian.state_dict())
    weights = copy.deepcopy(adapter.model.state_dict())
    run_training(training, batches)
    assert all(torch.equal(v, (student.gates.state_dict() | student.lagrangian.state_dict())[k]) for k, v in gates.items())
    assert any(not torch.equal(v, adapter.model.state_dict()[k]) for k, v in weights.items())
    assert [row["penalty"] for row in training.curve[5:]] == [0.0] * 5 and training.curve[5]["target"] == pytest.approx(0.6)
    ids = batches[0]["input_ids"]
    with torch.no_grad(), student.applied(student.fixed):
        trained = adapter.model(input_ids=ids)[0]
    student.finish(0.6)
    with torch.no_grad():
        assert torch.allclose(adapter.model(input_ids=ids)[0], trained, atol=1e-5)
    assert kept_fraction(adapter, student.geoms, SEQ) <= 0.6 + 1e-9  # geoms: the dense model's


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_cofi_removing_a_whole_layer_gives_a_model_that_loads_and_runs(name, tmp_path):
    adapter = adapter_for(tiny_model(name))
    student = CoFiStudent(adapter, SEQ)
    with torch.no_grad():
        for gates in student.gates.values():
            gates.log_alpha.fill_(10.0)
        for kind in ("attn", "ffn"):
            student.gates[_block_key((0, kind))].log_alpha.fill_(-10.0)
        student.gates[_unit_key((1, "ffn"))].log_alpha[:10] = -10.0
    ids = tiny_batches(1)[0]
    with torch.no_grad(), student.applied(student.final_gates(1.0)):
        gated = adapter.model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])[0]
    masks = student.finish(1.0)
    assert not masks.keep[(0, "attn")].any() and not masks.keep[(0, "ffn")].any()
    geom = adapter.geometry(0)
    assert geom.units == 0 and geom.ffn == 0 and adapter.geometry(1).ffn == 48 - 10
    save_pruned(adapter.model, tmp_path)
    loaded = load_pruned(tmp_path)
    with torch.no_grad():
        out = loaded(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])[0]
    assert torch.allclose(out, gated, atol=1e-4)


def test_cofi_distillation_loss_is_zero_for_the_dense_student_and_no_hook_outlives_close():
    adapter = adapter_for(tiny_model("bert"))
    student = CoFiStudent(adapter, SEQ)
    with torch.no_grad():
        for gates in student.gates.values():
            gates.log_alpha.fill_(40.0)  # every gate is 1 (to float precision) in eval
    student.eval()
    loss, parts = student.task_loss(tiny_batches(1)[0], None)
    assert loss.item() == pytest.approx(0.0, abs=1e-8)
    assert parts["matching"] == [0, 1]  # teacher layer i is matched by student layer i
    dense = copy.deepcopy(adapter.model)
    student.close()
    ids = tiny_batches(1)[0]["input_ids"]
    assert torch.equal(adapter.model(input_ids=ids)[0], dense(input_ids=ids)[0])  # no hooks left


@pytest.mark.parametrize("name", ["bert-cls", "gpt2", "llama", "roberta-cls"])
def test_cofi_cutting_hidden_dimensions_gives_the_gated_model_and_loads_back(name, tmp_path):
    adapter = adapter_for(tiny_model(name))
    student = CoFiStudent(adapter, SEQ)
    assert student.hidden
    with torch.no_grad():
        for gates in student.gates.values():
            gates.log_alpha.fill_(40.0)
        student.gates["hidden"].log_alpha[torch.tensor([1, 5, 6, 20, 31])] = -40.0
        student.gates[_block_key((1, "attn"))].log_alpha.fill_(-40.0)  # a removed block's bias is narrowed too
        student.gates[_unit_key((0, "ffn"))].log_alpha[:7] = -40.0
    batch = tiny_batches(1)[0]
    with torch.no_grad(), student.applied(student.final_gates(1.0)):
        gated = adapter.model(**batch)[0]
    dense_geoms = adapter.geometries()
    student.finish(1.0)
    assert adapter.hidden_size == 27 and adapter.model.get_input_embeddings().embedding_dim == 27
    with torch.no_grad():
        assert torch.allclose(adapter.model(**batch)[0], gated, atol=1e-5)
    save_pruned(adapter.model, tmp_path)
    loaded = load_pruned(tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded(**batch)[0], gated, atol=1e-5)
    ids = batch["input_ids"][:1]
    assert model_macs(adapter_for(loaded), ids.shape[1]) == pytest.approx(counted_macs(loaded, ids), rel=1e-6)
    assert kept_fraction(adapter_for(loaded), dense_geoms, SEQ) < 27 / 32


def test_a_bare_encoder_keeps_its_hidden_width():
    assert not CoFiStudent(adapter_for(tiny_model("bert")), SEQ).hidden  # its output is the stream


def test_cofi_adds_cross_entropy_where_a_classifier_has_labels():
    batch = with_labels(tiny_batches(1), [0, 2, 1, 1])[0]
    student = CoFiStudent(adapter_for(tiny_model("bert-cls")), SEQ)
    student.fix(1.0)  # the same gates in both calls
    with_ce, parts = student.task_loss(batch, None)
    without, _ = student.task_loss({k: v for k, v in batch.items() if k != "labels"}, None)
    assert parts["label_loss"] > 0 and float((with_ce - without).detach()) == pytest.approx(parts["label_loss"], rel=1e-5)
    lm = CoFiStudent(adapter_for(tiny_model("gpt2")), SEQ)
    assert "label_loss" not in lm.task_loss(batch, None)[1], "an LM's logits are per token: labels do not apply"

"""Mitigations as arm settings, on the tiny Llama: frozen bottom layers do not move, an L2 pull toward
the base keeps the weights nearer to it, and bad settings stop before a weight loads."""

from __future__ import annotations

import pytest
import torch

from harness import models, train
from harness.config import HarnessError, load_task


@pytest.fixture(scope="module")
def data(tiny_model, tiny_task, mirror):
    task = load_task(str(tiny_task))
    tok = models.load_tokenizer(str(tiny_model))
    examples, _ = train.training_examples(task, task.profiles["quick"], tok, mirror=mirror)
    return examples


def _train(method, overrides, tiny_model, tiny_task, examples, out):
    task = load_task(str(tiny_task), ["training.cuda_graphs=false", *overrides])
    return train.run(method, task=task, profile=task.profiles["quick"], model_path=str(tiny_model),
                     examples=examples, out_dir=out)


def test_frozen_layers_keep_their_weights(tmp_path, tiny_model, tiny_task, data):
    base = dict(models.load_base(str(tiny_model)).named_parameters())
    full = _train("full", ["mitigation.freeze_layers=1", "methods.full.learning_rate=1e-3"], tiny_model, tiny_task,
                  data, tmp_path / "full")
    moved = {n: not torch.equal(p.detach(), base[n].detach()) for n, p in full.model.named_parameters()}
    assert not any(v for n, v in moved.items() if ".layers.0." in n)  # frozen: bit for bit the base's
    assert all(v for n, v in moved.items() if ".layers.1." in n and n.endswith(".weight"))
    assert full.stats["mitigation"] == {"freeze_layers": 1, "l2_to_base": 0.0}
    lora = _train("lora", ["mitigation.freeze_layers=1"], tiny_model, tiny_task, data, tmp_path / "lora")
    b = {n: p for n, p in lora.model.named_parameters() if "lora_B" in n}
    assert b and all(torch.count_nonzero(p) == 0 for n, p in b.items() if ".layers.0." in n)  # still at init
    assert all(torch.count_nonzero(p) > 0 for n, p in b.items() if ".layers.1." in n)


def test_l2_to_base_keeps_full_fine_tuning_nearer_the_base(tmp_path, tiny_model, tiny_task, data):
    base = dict(models.load_base(str(tiny_model)).named_parameters())

    def distance(result):
        return sum(((p.detach() - base[n].detach()) ** 2).sum().item() for n, p in result.model.named_parameters())

    lr = "methods.full.learning_rate=1e-3"
    free = _train("full", [lr], tiny_model, tiny_task, data, tmp_path / "free")
    pulled = _train("full", [lr, "mitigation.l2_to_base=50"], tiny_model, tiny_task, data, tmp_path / "pulled")
    assert distance(pulled) < 0.5 * distance(free)
    assert pulled.stats["mitigation"]["l2_to_base"] == 50.0


@pytest.mark.parametrize("overrides, message", [
    (["mitigation.freeze_layers=-1"], "mitigation.freeze_layers: must be an integer >= 0, got -1"),
    (["mitigation.l2_to_base=-0.1"], "mitigation.l2_to_base: must be >= 0, got -0.1"),
    (["mitigation.freez_layers=1"], "did you mean 'freeze_layers'"),
])
def test_bad_mitigation_values_are_one_line(tiny_task, overrides, message):
    with pytest.raises(HarnessError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_task(str(tiny_task), overrides)


def test_mitigations_the_model_cannot_take_stop_in_planning(tiny_model):
    from harness.config import Mitigation

    kw = dict(lora={"r": 4}, quant={}, lr_scheduler="linear")
    with pytest.raises(HarnessError, match="freeze every one of the model's 2 decoder layers; at most 1"):
        models.check_method_settings({"full"}, str(tiny_model), mitigation=Mitigation(freeze_layers=2), **kw)
    with pytest.raises(HarnessError, match="l2_to_base: pulls full fine-tuning's weights toward the base; method lora"):
        models.check_method_settings({"lora"}, str(tiny_model), mitigation=Mitigation(l2_to_base=1.0), **kw)
    models.check_method_settings({"full"}, str(tiny_model), mitigation=Mitigation(freeze_layers=1, l2_to_base=1.0), **kw)

"""Training speed levers keep the numerics: padding-free packing gives the padded batch's loss and
gradients, masks only prompts, and leaves steps and examples the same for every arm."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from harness import models, train
from harness.config import load_task


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_task, mirror):
    task = load_task(str(tiny_task))
    tok = models.load_tokenizer(str(tiny_model))
    examples, _ = train.training_examples(task, task.profiles["quick"], tok, mirror=mirror)
    return task, tok, examples


def _model(path):
    model = models.load_base(str(path))
    model.config.use_cache = False  # as train.run sets it
    return model


def _on(model, batch):
    """The batch on the model's device: load_base puts the model on the GPU where there is one."""
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def _loss(model, batch):
    return model(**_on(model, batch)).loss


def _assert_same_loss_and_gradients(model, batch, reference):
    """One forward and backward on each batch: equal losses and equal gradients (fp32)."""
    results = []
    for b in (reference, batch):
        model.zero_grad()
        loss = _loss(model, b)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l_ref, g_ref), (l_b, g_b) = results
    torch.testing.assert_close(l_b, l_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_b, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_packed_loss_and_gradients_equal_padded(setup, tiny_model):
    task, tok, examples = setup
    feats = examples[:6]
    padded = train.collator(tok, packing=False)(feats)
    packed = train.collator(tok, packing=True)(feats)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["input_ids"].shape[1] == sum(len(e["input_ids"]) for e in feats)  # no padding at all
    assert padded["input_ids"].numel() > packed["input_ids"].numel()
    _assert_same_loss_and_gradients(_model(tiny_model), packed, padded)


def test_packed_examples_do_not_see_each_other(setup, tiny_model):
    """Changing one example must not change the loss terms of the example packed after it."""
    _, tok, examples = setup
    a, b = examples[0], examples[1]
    other = dict(a, input_ids=[(t + 1) % 10 + 4 for t in a["input_ids"]])
    model = _model(tiny_model).eval()
    pack = train.collator(tok, packing=True)
    with torch.no_grad():
        logits = [model(**_on(model, pack([x, b]))).logits[0, len(a["input_ids"]):] for x in (a, other)]
    torch.testing.assert_close(logits[0], logits[1])
    # With a KV cache enabled, transformers would ignore the boundaries: the reason train.run disables it.
    model.config.use_cache = True
    with torch.no_grad():
        leaky = model(**_on(model, pack([other, b]))).logits[0, len(a["input_ids"]):]
    assert not torch.allclose(leaky, logits[0])


def test_packing_masks_only_prompts(setup):
    _, tok, examples = setup
    feats = examples[:5]
    packed = train.collator(tok, packing=True)(feats)
    labels, pos = packed["labels"][0].tolist(), packed["position_ids"][0].tolist()
    start = 0
    for e in feats:
        n = len(e["input_ids"])
        assert pos[start:start + n] == list(range(n))
        # Each example's first label is dropped (never a target: nothing precedes it), the rest kept.
        assert labels[start] == -100 and labels[start + 1:start + n] == e["labels"][1:]
        assert any(x != -100 for x in e["labels"]) and e["labels"][0] == -100  # answer learned, prompt masked
        start += n
    padded = train.collator(tok, packing=False)(feats)
    # The trainer normalises by the target count: the same in both layouts.
    assert (packed["labels"][..., 1:] != -100).sum() == (padded["labels"][..., 1:] != -100).sum()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_trained_weights_match_padded_training(tmp_path, tiny_model, tiny_task, mirror, method):
    # lora_dropout=0: dropout masks depend on the tensor layout, everything else must not.
    runs = {}
    for packing in (True, False):
        task = load_task(str(tiny_task), [f"training.packing={str(packing).lower()}", "lora.lora_dropout=0.0"])
        profile = task.profiles["quick"]
        tok = models.load_tokenizer(str(tiny_model))
        examples, _ = train.training_examples(task, profile, tok, mirror=mirror)
        res = train.run(method, task=task, profile=profile, model_path=str(tiny_model), examples=examples,
                        out_dir=tmp_path / f"{method}-{packing}")
        runs[packing] = res
    packed, padded = runs[True], runs[False]
    assert packed.stats["steps"] == padded.stats["steps"] and packed.stats["packing"] and not padded.stats["packing"]
    losses = [[h["loss"] for h in r.stats["loss_history"]] for r in (packed, padded)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    sd_pack = {k: v for k, v in packed.model.named_parameters() if v.requires_grad}
    sd_pad = {k: v for k, v in padded.model.named_parameters() if v.requires_grad}
    assert sd_pack.keys() == sd_pad.keys() and sd_pack
    for k in sd_pack:
        torch.testing.assert_close(sd_pack[k], sd_pad[k], rtol=1e-3, atol=1e-4, msg=k)
    assert packed.model.config.use_cache == padded.model.config.use_cache  # restored after training


def test_every_arm_same_steps_and_examples(tmp_path, tiny_model, tiny_task, mirror):
    task = load_task(str(tiny_task))
    profile = task.profiles["quick"]
    tok = models.load_tokenizer(str(tiny_model))
    examples, record = train.training_examples(task, profile, tok, mirror=mirror)
    stats = [train.run(m, task=task, profile=profile, model_path=str(tiny_model), examples=examples,
                       out_dir=tmp_path / m).stats for m in ("full", "qlora")]
    assert {(s["steps"], s["batch_size"], s["epochs"]) for s in stats} == {(4, 8, 1.0)}
    assert record["examples"] == 32


def test_flos_counted_as_transformers_does(tmp_path, tiny_model):
    from transformers import Trainer, TrainingArguments

    model = models.load_base(str(tiny_model))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    batch = {"input_ids": torch.ones(2, 7, dtype=torch.long)}
    ours = train._trainer_class()(model=model, args=args)
    assert ours.floating_point_ops(batch) == Trainer(model=model, args=args).floating_point_ops(batch) > 0
    # Counted once: later calls (another batch shape too) do not walk the model again, and still agree.
    walks = []
    original = model.num_parameters
    model.num_parameters = lambda *a, **k: walks.append(1) or original(*a, **k)
    longer = {"input_ids": torch.ones(3, 11, dtype=torch.long)}
    assert ours.floating_point_ops(longer) == Trainer(model=model, args=args).floating_point_ops(longer)
    assert len(walks) == 1  # only the fresh Trainer counted


def test_lean_steps_keeps_modes_and_gradients_as_trainer_expects(tiny_model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(tiny_model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    with train.lean_steps(model):
        model.eval()
        assert not any(m.training for m in model.modules())
        model.train()
        assert all(m.training for m in model.modules())
        inner = next(m for m in model.modules() if m is not model)
        inner.training = False
        model.train()  # same mode: no walk (nothing else changes modes while training)
        assert not inner.training
        model.eval()  # a change of mode walks every module
        assert not any(m.training for m in model.modules())
        model.train()
        assert inner.training
        _loss(model, train.collator(models.load_tokenizer(str(tiny_model)), packing=True)(
            [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]}])).backward()
        assert all(p.grad is not None for p in trainable) and all(p.grad is None for p in frozen)
        model.zero_grad()
        assert all(p.grad is None for p in model.parameters())
    # the instance overrides are gone: the class's own methods answer again
    assert "train" not in vars(model) and "zero_grad" not in vars(model)
    model.eval()
    assert not any(m.training for m in model.modules())


def test_checkpoints_by_time_and_by_steps_at_logging_steps_only(monkeypatch):
    from transformers import TrainerControl, TrainerState

    from harness.config import Training

    clock = [0.0]
    monkeypatch.setattr(train.time, "monotonic", lambda: clock[0])

    def saves(training, max_steps, minutes_per_step):
        cb = train._checkpoint_callback()(training, max_steps, arm="full")
        out = []
        for step in range(1, max_steps + 1):
            clock[0] += 60 * minutes_per_step
            control = cb.on_step_end(None, TrainerState(global_step=step), TrainerControl())
            if control.should_save:
                out.append(step)
                cb.last = clock[0]  # as on_save does
        return out

    # every 10 minutes, at a logging step; never after the last step (the arm is saved whole then)
    assert saves(Training(logging_steps=5), 40, 1.0) == [10, 20, 30]
    assert saves(Training(logging_steps=5, save_minutes=0), 40, 1.0) == []
    assert saves(Training(logging_steps=5, save_minutes=0, save_steps=12), 40, 0.0) == [15, 30]
    assert saves(Training(logging_steps=1), 40, 0.01) == []  # a short run writes no checkpoint


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_compiled_blocks_keep_the_loss_and_gradients(setup, tiny_model, method):
    """training.compile: each decoder block compiled in place (one graph, dynamic lengths) gives the
    eager loss and gradients, keeps parameter names, and is eager again afterwards. aot_eager traces
    exactly what inductor would compile, without generating kernels (seconds, not minutes, on CPU)."""
    task, tok, examples = setup
    torch.manual_seed(0)
    lora = {**task.lora, "lora_dropout": 0.0}  # dropout's random draws differ between eager and compiled
    model, _, _ = models.build_model(method, str(tiny_model), lora=lora, quant=task.quant)
    model.config.use_cache = False
    names = [n for n, _ in model.named_parameters()]
    pack = train.collator(tok, packing=True)
    batches = [pack(examples[i:i + 4]) for i in (0, 4, 8)]  # three packed lengths
    results = []
    for compiled in (False, True):
        with train.compiled_blocks(model, compiled, backend="aot_eager", fullgraph=True) as n:
            assert n == (2 if compiled else 0)  # the tiny Llama's two decoder layers
            model.zero_grad()
            losses = [_loss(model, b) for b in batches]
            sum(losses).backward()
        results.append((torch.stack(losses).detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (l_eager, g_eager), (l_comp, g_comp) = results
    torch.testing.assert_close(l_comp, l_eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert [n for n, _ in model.named_parameters()] == names
    assert all(b._compiled_call_impl is None for b in train.repeated_blocks(model))


def test_fixed_length_rows_keep_the_loss_and_gradients(setup, tiny_model):
    """CUDA graphs need one shape per step: packed rows padded to a bound. Pad tokens sit at position 0
    (each its own sequence) with label -100, so the loss and gradients are the unpadded row's."""
    _, tok, examples = setup
    feats = examples[:5]
    length = train.packed_length(examples, 5)
    assert length % 64 == 0 and length >= sum(sorted((len(e["input_ids"]) for e in examples))[-5:])
    packed = train.collator(tok, packing=True)(feats)
    fixed = train.fixed_length(train.collator(tok, packing=True), length)(feats)
    n = packed["input_ids"].shape[1]
    assert fixed["input_ids"].shape == (1, length) and length > n
    assert (fixed["position_ids"][0, n:] == 0).all() and (fixed["labels"][0, n:] == -100).all()
    _assert_same_loss_and_gradients(_model(tiny_model), fixed, packed)
    with pytest.raises(Exception, match="exceeds its bound"):
        train.fixed_length(train.collator(tok, packing=True), 8)(feats)


def _train(tmp_path, tiny_model, tiny_task, mirror, method, name, overrides=()):
    task = load_task(str(tiny_task), ["lora.lora_dropout=0.0", *overrides])
    profile = task.profiles["quick"]
    tok = models.load_tokenizer(str(tiny_model))
    examples, _ = train.training_examples(task, profile, tok, mirror=mirror)
    return train.run(method, task=task, profile=profile, model_path=str(tiny_model), examples=examples,
                     out_dir=tmp_path / name)


def _same_training(a, b, rtol, atol=None, rounding_fraction=0.0):
    """Same steps, losses and trained weights. `rounding_fraction`: the share of weight elements allowed
    outside rtol/atol, each still within Adam's own bound of 2 x learning rate per step. Why: the two
    paths sum the same fp32 products in different orders (other matmul shapes); where an element's
    gradient is of rounding size, Adam's normalised update m/sqrt(v) turns that rounding into a
    different step of up to the learning rate, so a handful of elements differ by a fraction of lr
    while every other element, and every loss, agrees to 1e-4."""
    assert a.stats["steps"] == b.stats["steps"]
    assert [h["loss"] for h in a.stats["loss_history"]] == pytest.approx(
        [h["loss"] for h in b.stats["loss_history"]], rel=rtol)
    wa = {k: v for k, v in a.model.named_parameters() if v.requires_grad}
    wb = {k: v for k, v in b.model.named_parameters() if v.requires_grad}
    assert wa.keys() == wb.keys() and wa
    atol = rtol / 10 if atol is None else atol
    adam_bound = 2 * a.stats["learning_rate"] * a.stats["steps"]
    outside = total = 0
    for k in wa:
        diff = (wa[k] - wb[k]).detach().abs()
        far = diff > atol + rtol * wb[k].detach().abs()
        outside, total = outside + int(far.sum()), total + diff.numel()
        if not rounding_fraction:
            torch.testing.assert_close(wa[k], wb[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
        assert float(diff.max()) <= adam_bound, f"{k}: differs by {float(diff.max()):.3g}, over Adam's bound {adam_bound:.3g}"
    assert outside <= rounding_fraction * total, f"{outside} of {total} weights differ beyond rtol {rtol}"
    assert all(p.grad is None for p in a.model.parameters())  # no gradient memory kept into evaluation


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, the next test replays real graphs")
@pytest.mark.parametrize("method,micro", [("full", 4), ("qlora", 4), ("full", 8)])
def test_step_graph_path_trains_as_the_plain_step(monkeypatch, tmp_path, tiny_model, tiny_task, mirror, method,
                                                  micro):
    """The StepGraph path (fixed-length rows, the loss through the captured module; two micro-steps
    accumulated per step into persistent gradients zeroed in place, or one) learns what the plain
    path does. There is no CUDA here, so the capture is the module itself: the plumbing around the
    graph is what is tested; test_cuda_graph_steps_train_as_eager_steps replays real graphs on a GPU."""
    micro_kw = [f"methods.{method}.micro_batch_size={micro}"]
    plain = _train(tmp_path, tiny_model, tiny_task, mirror, method, "plain", micro_kw)
    assert plain.stats["cuda_graphs"] is False and plain.stats["padded_length"] is None
    captured = []
    monkeypatch.setattr(train, "graphs_available", lambda: True)
    monkeypatch.setattr(train, "graph_capture", lambda module, args: captured.append(args) or module)
    graphed = _train(tmp_path, tiny_model, tiny_task, mirror, method, "graphed", micro_kw)
    assert graphed.stats["cuda_graphs"] is True and len(captured) == 1  # captured once, then replayed
    assert captured[0][0].shape == (1, graphed.stats["padded_length"])
    assert graphed.stats["micro_batch_size"] == micro
    import gc

    gc.collect()  # the captured step (on a GPU: its graphs and their memory pool) ends with the training
    assert not [o for o in gc.get_objects() if isinstance(o, train.StepGraph)]
    _same_training(graphed, plain, rtol=1e-4, rounding_fraction=1e-3)
    if micro == 8:
        return
    # Where graphs cannot serve (or are turned off), the plain step runs.
    for off in ("training.cuda_graphs=false", "training.packing=false"):
        res = _train(tmp_path, tiny_model, tiny_task, mirror, method, off.split(".")[1], [off])
        assert res.stats["cuda_graphs"] is False and len(captured) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the H200)")
@pytest.mark.parametrize("method,micro", [("full", 4), ("lora", 4), ("qlora", 4), ("full", 8), ("qlora", 8)])
def test_cuda_graph_steps_train_as_eager_steps(tmp_path, tiny_model, tiny_task, mirror, method, micro):
    """Real CUDA graphs: captured once, replayed every micro-step. Two micro-steps per optimizer step
    (micro 4 of 8): gradients accumulate into persistent .grad tensors, not into the graph's output
    buffer; one (micro 8): .grad is that buffer. bf16 autocast on both sides; the padded rows change
    matmul shapes, hence a bf16-sized tolerance."""
    micro_kw = [f"methods.{method}.micro_batch_size={micro}"]
    eager = _train(tmp_path, tiny_model, tiny_task, mirror, method, "eager", ["training.cuda_graphs=false", *micro_kw])
    graphed = _train(tmp_path, tiny_model, tiny_task, mirror, method, "graphed", micro_kw)
    assert graphed.stats["cuda_graphs"] is True and eager.stats["cuda_graphs"] is False
    assert graphed.stats["graph_capture_seconds"] > 0
    _same_training(graphed, eager, rtol=2e-2, atol=2e-3)


def test_training_optim_is_the_optimizer_the_trainer_steps_with(tmp_path, tiny_model, tiny_task, mirror, monkeypatch):
    """training.optim reaches HF Trainer (the optimizer it built is the one named), and the arm's record
    names it for the report."""
    task = load_task(str(tiny_task), ["training.optim=sgd", "training.warmup_ratio=0.0", "training.lr_scheduler=constant"])
    profile = dataclasses.replace(task.profiles["quick"], max_steps=1)
    tok = models.load_tokenizer(str(tiny_model))
    examples, _ = train.training_examples(task, profile, tok, mirror=mirror)
    steps = []
    sgd_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: steps.append(1) or sgd_step(self, *a, **k))
    res = train.run("full", task=task, profile=profile, model_path=str(tiny_model), examples=examples,
                    out_dir=tmp_path / "sgd")
    assert res.stats["optim"] == "sgd" and res.stats["steps"] == 1 and steps == [1]
    from harness import report

    metrics = {"arms": {"full": {"train": res.stats}}, "labels": {}}
    text = " ".join(str(b) for b in report._training(metrics))
    assert "Optimizer (`training.optim`): full sgd." in text


def test_training_leaves_no_optimizer_state_or_gradients_behind(tmp_path, tiny_model, tiny_task, mirror):
    """The arm is evaluated in the process that trained it: AdamW's moments, the gradients and (on a GPU)
    the CUDA graphs' pools must be gone by then, or the evaluation (and its memory figure) carries them.
    At 8B on an 80 GB GPU, 25 GiB left in the graphs' pools made the arm's KL step run out of memory."""
    import gc

    task = load_task(str(tiny_task))
    profile = dataclasses.replace(task.profiles["quick"], max_steps=2)
    tok = models.load_tokenizer(str(tiny_model))
    examples, _ = train.training_examples(task, profile, tok, mirror=mirror)
    res = train.run("full", task=task, profile=profile, model_path=str(tiny_model), examples=examples,
                    out_dir=tmp_path / "full")
    params = {id(p) for p in res.model.parameters()}
    assert all(p.grad is None for p in res.model.parameters())
    gc.collect()
    holders = [o for o in gc.get_objects() if isinstance(o, torch.optim.Optimizer)
               and any(id(p) in params for g in o.param_groups for p in g["params"])]
    assert not holders, f"{len(holders)} optimizer(s) still hold the arm's parameters after training"


def test_graph_capture_warms_up_without_keeping_a_second_set_of_gradients(monkeypatch):
    """torch's make_graphed_callables keeps its warm-up's last gradients alive through the capture (a
    second full set of gradients: 32 GB at 8B full fine-tuning). The harness warms up itself, frees
    them, and captures with no warm-up of torch's. (On a GPU, the graphed steps' results are checked
    against eager ones by test_cuda_graph_steps_train_as_eager_steps.)"""
    import contextlib
    import gc
    import weakref

    class Loss(torch.nn.Module):  # tensors in, a loss out, as StepGraph's
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 1)

        def forward(self, x):
            return self.linear(x).sum()

    loss_of, sample = Loss(), (torch.randn(2, 4),)
    grads_made, seen = [], {}
    plain_grad = torch.autograd.grad

    def grad(*a, **k):
        out = plain_grad(*a, **k)
        grads_made.extend(weakref.ref(g) for g in out if g is not None)
        return out

    def make_graphed_callables(fn, args, num_warmup_iters=3):
        gc.collect()
        seen.update(warmups=num_warmup_iters, alive=[r() is not None for r in grads_made])
        return fn

    monkeypatch.setattr(torch.autograd, "grad", grad)
    for name, fake in (("synchronize", lambda: None), ("empty_cache", lambda: None), ("Stream", lambda: None),
                       ("stream", lambda s: contextlib.nullcontext()),
                       ("make_graphed_callables", make_graphed_callables)):
        monkeypatch.setattr(torch.cuda, name, fake)
    assert train.graph_capture(loss_of, sample) is loss_of
    assert seen == {"warmups": 0, "alive": [False, False]}  # one warm-up (weight, bias), its gradients gone

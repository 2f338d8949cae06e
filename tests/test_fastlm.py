"""The harness's lm-eval model class against lm-eval's stock HFLM, document by document (fp32, CPU)."""

from __future__ import annotations

import pytest

from harness import evaluate

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


def _lms(model, tokenizer, **kw):
    from lm_eval.models.huggingface import HFLM

    from harness.fastlm import HarnessLM

    return HFLM(pretrained=model, tokenizer=tokenizer, **kw), HarnessLM(pretrained=model, tokenizer=tokenizer, **kw)


def test_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    from harness.fastlm import HarnessLM

    assert get_model("harness") is HarnessLM


def test_eval_backend_is_checked():
    from harness.config import HarnessError, Profile

    assert Profile().eval_backend == "auto"  # the harness class, on GPU and CPU
    with pytest.raises(HarnessError, match="eval_backend"):
        Profile(eval_backend="vllm")


def _requests(pairs):
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def _assert_same(stock, fast):
    assert len(stock) == len(fast)
    for (a, ga), (b, gb) in zip(stock, fast, strict=True):
        assert abs(a - b) < TOL and ga == gb


def _mc_pairs():
    """Multiple-choice shapes lm-eval makes: shared contexts with 2-4 choices of different lengths,
    one-token choices (boolq), a shared continuation after differing contexts (winogrande), trailing
    spaces, an empty context, a one-token context."""
    q = "question: which plant will grow in the sun? answer:"
    pairs = [(q, " water"), (q, " the rock will heat up"), (q, " light energy"), (q, " cell")]
    pairs += [("market rates rise and profit falls. question: is it weak? answer:", c) for c in (" yes", " no")]
    pairs += [(f"the {w} stock will rise", " and profit is up") for w in ("bank", "market")]
    pairs += [("the bank rate cut ", "growth"), ("the bank rate cut ", "loss and falls")]
    pairs += [("", "bank rate"), ("bank", " rate up"), ("bank", " down")]
    return pairs


def test_loglikelihood_matches_hflm_request_by_request(tiny):
    stock, fast = _lms(*tiny, batch_size=3)
    reqs = _requests(_mc_pairs())
    _assert_same(stock.loglikelihood(reqs), fast.loglikelihood(reqs))


def _batch_sizes(fast) -> list[int]:
    """Contexts per scoring batch of `fast`, appended as it scores."""
    batches = []
    score = fast._score_batch
    fast._score_batch = lambda batch, encoded: batches.append(len(batch)) or score(batch, encoded)
    return batches


def test_memory_cap_splits_batches_without_changing_scores(tiny):
    model, tokenizer = tiny
    stock, fast = _lms(model, tokenizer, batch_size=16)
    batches = _batch_sizes(fast)
    kv, logit = fast._bytes_per_token
    cfg = model.config
    assert kv == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert logit == cfg.vocab_size * 4
    reqs = _requests(_mc_pairs())
    roomy = fast.loglikelihood(reqs)
    n_roomy = len(batches)
    fast.mc_memory_bytes = 1  # below any one context: every context is a batch of its own
    batches.clear()
    tight = fast.loglikelihood(reqs)
    assert n_roomy < len(batches) and set(batches) == {1}
    _assert_same(stock.loglikelihood(reqs), tight)
    _assert_same(roomy, tight)


def test_prefix_ratio_trades_padding_for_fewer_batches_same_scores(tiny):
    """mc_prefix_ratio (0.5 on GPUs): contexts of more unequal lengths share a batch; scores unchanged."""
    model, tokenizer = tiny
    stock, fast = _lms(model, tokenizer, batch_size=64)
    batches = _batch_sizes(fast)
    reqs = _requests(_mc_pairs())
    counts = {}
    for ratio in (0.75, 0.5, 0.0):
        fast.mc_prefix_ratio = ratio
        batches.clear()
        _assert_same(stock.loglikelihood(reqs), fast.loglikelihood(reqs))
        counts[ratio] = len(batches)
    assert counts[0.75] >= counts[0.5] >= counts[0.0] == 1 < counts[0.75]


def test_tokenization_is_hflms(tiny):
    stock, fast = _lms(*tiny, batch_size=4)
    pairs = _mc_pairs()
    expect = []
    for ctx, cont in pairs:
        if ctx == "":
            enc = stock.tok_encode(cont, add_special_tokens=False)
            expect.append(([stock.prefix_token_id], enc))
        else:
            expect.append(stock._encode_pair(ctx, cont))
    assert fast.encode_pairs(pairs) == [tuple(e) for e in expect]


def test_over_long_inputs_are_truncated_as_hflm_does(tiny):
    # max_length 8: most requests exceed it and HFLM left-truncates them one by one.
    stock, fast = _lms(*tiny, batch_size=4, max_length=8)
    reqs = _requests(_mc_pairs())
    _assert_same(stock.loglikelihood(reqs), fast.loglikelihood(reqs))


def test_greedy_flag_is_true_where_the_model_would_generate_the_continuation(tiny):
    model, tokenizer = tiny
    stock, fast = _lms(model, tokenizer, batch_size=8)
    ids = tokenizer("the bank rate", return_tensors="pt")["input_ids"]
    nxt = model(ids).logits[0, -1].argmax().item()
    word = tokenizer.decode([nxt])
    reqs = _requests([("the bank rate", " " + word), ("the bank rate", " " + ("up" if word != "up" else "down"))])
    a, b = stock.loglikelihood(reqs), fast.loglikelihood(reqs)
    _assert_same(a, b)
    assert [g for _, g in b] == [True, False]


def test_peft_model_matches_hflm(tiny):
    import copy

    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.eval()
    stock, fast = _lms(peft, tokenizer, batch_size=5)
    reqs = _requests(_mc_pairs())
    a, b = stock.loglikelihood(reqs), fast.loglikelihood(reqs)
    _assert_same(a, b)
    # the adapter changes the scores: the PeftModel, not its base, was run
    base = _lms(model, tokenizer, batch_size=5)[1].loglikelihood(reqs)
    assert max(abs(x - y) for (x, _), (y, _) in zip(a, base, strict=True)) > 1e-3


def test_suite_results_match_hflm_document_by_document(tiny, mirror):
    tasks = ["arc_easy", "boolq"]
    model, tokenizer = tiny
    ref = evaluate.evaluate(model, tokenizer, tasks, mirror=mirror, limit=None, batch_size=4, backend="hf",
                            raw=True)
    got = evaluate.evaluate(model, tokenizer, tasks, mirror=mirror, limit=None, batch_size=4, backend="harness",
                            raw=True)
    assert ref["results"] == got["results"] or all(
        abs(ref["results"][t][m] - got["results"][t][m]) < 1e-9
        for t in tasks for m in ref["results"][t] if ref["results"][t][m] is not None)
    agree = evaluate.agreement(ref["raw"], got["raw"])
    assert agree["documents"] == 24 and agree["same_pred"] == 24 and agree["same_greedy"]
    assert agree["max_abs_diff"] < TOL


def test_eager_attention_takes_an_additive_mask(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager").eval()
    stock, fast = _lms(model, AutoTokenizer.from_pretrained(tiny_model), batch_size=4)
    assert fast._mask_kind == "additive"
    reqs = _requests(_mc_pairs())
    _assert_same(stock.loglikelihood(reqs), fast.loglikelihood(reqs))


def test_requests_a_custom_mask_cannot_serve_go_to_hflms_path(tiny):
    """Attention without 4D-mask support (flash, flex) or a sliding window shorter than the request:
    HFLM's own per-request path, same scores."""
    model, tokenizer = tiny
    stock, fast = _lms(model, tokenizer, batch_size=4)
    reqs = _requests(_mc_pairs())
    shared = []
    score = fast._shared_prefix_scores
    fast._shared_prefix_scores = lambda enc: shared.append(len(enc)) or score(enc)
    fast.__dict__["_mask_kind"] = None  # as for flash_attention_2
    _assert_same(stock.loglikelihood(reqs), fast.loglikelihood(reqs))
    assert shared == []
    encoded = fast.encode_pairs(_mc_pairs())
    model.config.sliding_window = 6  # checked only: a Llama given a sliding window would apply it
    try:
        packable = [fast._packable(c, k) for c, k in encoded]
    finally:
        del model.config.sliding_window
    assert packable == [len(c) >= 2 and len(c) + len(k) <= 6 for c, k in encoded]
    assert 0 < sum(packable) < len(reqs)


def _gen_requests(prompts, max_gen_toks=4):
    from lm_eval.api.instance import Instance

    kw = {"until": ["\n\n"], "max_gen_toks": max_gen_toks, "do_sample": False}
    return [Instance("generate_until", {}, (p, dict(kw)), i) for i, p in enumerate(prompts)]


def test_generation_batch_follows_the_memory_budget(tiny):
    from harness.fastlm import HarnessLM

    model, tok = tiny
    reqs = _gen_requests(["the sun and the rock " * k for k in (1, 3, 6)], max_gen_toks=8)
    lm = HarnessLM(pretrained=model, tokenizer=tok, batch_size=1, gen_memory_bytes=2**40)
    assert lm.generation_batch(reqs) == 3  # everything fits: one batch
    kv, _ = lm._bytes_per_token
    longest = max(len(lm.tok_encode(r.args[0])) for r in reqs)
    width = 6 * model.config.hidden_size + 3 * model.config.intermediate_size
    per_prompt = max(kv * (longest + 8), kv * longest + longest * width * 4)  # fp32 model
    lm.gen_memory_bytes = 2 * per_prompt + 1
    assert lm.generation_batch(reqs) == 2
    lm.gen_memory_bytes = 1
    assert lm.generation_batch(reqs) == 1  # never zero


def test_larger_generation_batches_generate_what_hflm_does(tiny):
    """One batch of every prompt, or one prompt per batch (HFLM at batch 1): the same greedy text."""
    model, tok = tiny
    prompts = ["question: which plant will grow in the sun? answer:", "the rock", "water and light energy is"]
    stock, _ = _lms(model, tok, batch_size=1)
    from harness.fastlm import HarnessLM

    fast = HarnessLM(pretrained=model, tokenizer=tok, batch_size=1, gen_memory_bytes=2**40)
    calls = []
    original = fast._model_generate
    fast._model_generate = lambda context, **kw: calls.append(context.shape[0]) or original(context=context, **kw)
    assert fast.generate_until(_gen_requests(prompts)) == stock.generate_until(_gen_requests(prompts))
    assert calls == [3] and fast.batch_size_per_gpu == 1  # one batch, and lm-eval's batch size restored

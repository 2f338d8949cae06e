"""lm-eval's HF model class with a faster multiple-choice log-likelihood path (registered as "harness").

Everything but `loglikelihood` is lm-eval's HFLM (generation, rolling log-likelihood for perplexity,
tokenizer and model handling). Where HFLM re-encodes a document's context once per choice, pads each
request to the batch's longest, and moves per-request tensors to the CPU, this class:

- tokenizes each distinct string once, in one batched tokenizer call, with HFLM's own rules
  (trailing spaces moved to the continuation, the whole string encoded and split at the context's
  length, BOS handling);
- runs each distinct context once (all tokens but the last) and keeps its KV cache;
- scores all continuations of that context in one row after the cache: each is the context's last
  token followed by the continuation minus its last token, at the positions the full sequence would
  have, and a 4D attention mask lets it see the context and its own earlier tokens only, so the
  log-probabilities are those of HFLM's single pass, up to floating-point order. Nothing is copied
  per continuation, and a batch groups contexts of similar length and similar total continuation
  length: padding every continuation to the batch's longest was over half of the arithmetic on the
  six-task suite (3.7 M scored positions for 1.35 M real ones);
- does log-softmax, gather and the greedy check on the device, and copies two numbers per request to
  the CPU once at the end.

Requests the shared-prefix path cannot score exactly as HFLM does (a one-token context, a context
plus continuation longer than the model's window, which HFLM truncates per request from the left, or
than a sliding attention window) go to HFLM's own `_loglikelihood_tokens`, as does everything on a
seq2seq model, with several ranks, or with an attention implementation that takes no custom 4D mask
(flash, flex: only SDPA and eager do).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix, normalize_gen_kwargs

log = logging.getLogger(__name__)


@register_model("harness")
class HarnessLM(HFLM):
    """HFLM whose multiple-choice path scores up to `mc_batch_size` requests (continuations; default
    `batch_size`) per pair of forward passes, whose shortest context is at least `mc_prefix_ratio` of
    its longest (default 3/4; lower: more padding, fewer passes), and at most `mc_memory_bytes` of the
    batch's two big tensors: the KV cache of its prefixes and packed continuations, and the
    continuations' logits (estimated from the model's config; default 8 GiB on CUDA, 2 GiB on CPU).
    Without that cap, 512 long continuations of a 49k-token vocabulary made the allocator reserve
    135 GiB of an H200. On a CUDA out-of-memory error the cap halves and the batch is retried.
    `batch_size` stays HFLM's for everything else (rolling log-likelihood, generation)."""

    def __init__(self, *args, mc_batch_size: int | None = None, mc_memory_bytes: int | None = None,
                 mc_prefix_ratio: float = 0.75, gen_memory_bytes: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.mc_batch_size = int(mc_batch_size) if mc_batch_size else None
        self.mc_prefix_ratio = float(mc_prefix_ratio)
        default = (8 if self.device.type == "cuda" else 2) * 2**30
        self.mc_memory_bytes = int(mc_memory_bytes) if mc_memory_bytes else default
        self.gen_memory_bytes = int(gen_memory_bytes) if gen_memory_bytes else None

    @functools.cached_property
    def _text_config(self):
        cfg = self.model.config
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    @functools.cached_property
    def _bytes_per_token(self) -> tuple[int, int]:
        """(KV-cache bytes per cached token, logits bytes per scored token), from the model's config."""
        cfg = self._text_config
        size = next(self.model.parameters()).element_size() if self.mixed_precision_dtype is None else 2
        size = max(size, 2)  # a 4-bit base computes in 16 or 32 bits
        heads = getattr(cfg, "num_attention_heads", 1)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv = cfg.num_hidden_layers * 2 * (getattr(cfg, "num_key_value_heads", None) or heads) * head_dim * size
        return kv, cfg.vocab_size * size

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """HFLM's greedy generation (its length-sorted batching, stop strings, chat handling) with as
        many prompts per batch as `gen_memory_bytes` holds (where set: on CUDA). A decoding step of a
        small model costs about the same at 64 or 541 prompts (Python and kernel launches, not
        arithmetic), and a batch runs until its longest answer ends: lm-eval's `batch_size=auto`
        (64) decodes IFEval's 541 prompts in 9 batches, this in one. On an out-of-memory error the
        batch halves and generation starts again."""
        if (not self.gen_memory_bytes or not isinstance(self.batch_size_per_gpu, int) or not requests
                or self.backend != "causal" or self.world_size > 1):
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        saved = self.batch_size_per_gpu
        n = self.generation_batch(requests)
        try:
            while True:
                self.batch_size_per_gpu = n
                try:
                    return super().generate_until(requests, disable_tqdm=disable_tqdm)
                except torch.cuda.OutOfMemoryError:
                    if n == 1:
                        raise
                    n = max(1, n // 2)
                    torch.cuda.empty_cache()
                    log.warning("out of memory generating; retrying with %d prompts per batch", n)
        finally:
            self.batch_size_per_gpu = saved

    def generation_batch(self, requests) -> int:
        """Prompts per generation batch: every request, or as many as fit `gen_memory_bytes` at the
        longest (left-padded) prompt: its KV cache grown by the longest generation, or the prefill's
        activations of one layer (hidden states, q/k/v, the MLP's three projections), the larger."""
        cfg = self._text_config
        gen = max(int(normalize_gen_kwargs(dict(r.args[1]), self.max_gen_toks)["max_gen_toks"]) for r in requests)
        ctx = min(max(len(self.tok_encode(r.args[0])) for r in requests), max(self.max_length - gen, 1))
        kv, _ = self._bytes_per_token
        width = 6 * cfg.hidden_size + 3 * (getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size)
        size = next(self.model.parameters()).element_size()
        per_prompt = max(kv * (ctx + gen), kv * ctx + ctx * width * max(size, 2))
        return max(1, min(len(requests), self.gen_memory_bytes // max(per_prompt, 1)))

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if (self.enable_thinking or self.backend != "causal" or self.world_size > 1
                or not isinstance(self.batch_size, int)):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        pairs = [req.args for req in requests]
        encoded = self.encode_pairs(pairs)
        shared, stock = [], []
        for i, (ctx, cont) in enumerate(encoded):
            (shared if self._mask_kind and self._packable(ctx, cont) else stock).append(i)
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        if stock:
            reqs = [(pairs[i], *encoded[i]) for i in stock]
            for i, answer in zip(stock, self._loglikelihood_tokens(reqs, disable_tqdm=True), strict=True):
                out[i] = answer  # HFLM already fed its cache hook
        if shared:
            for i, answer in zip(shared, self._shared_prefix_scores([encoded[i] for i in shared]), strict=True):
                out[i] = answer
                self.cache_hook.add_partial("loglikelihood", pairs[i], answer)
        return out

    @functools.cached_property
    def _cache_kwarg(self) -> str:
        """transformers renamed forward's `past_key_values` to `cache` (5.2x; the old name goes in 5.40)."""
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    # -- tokenization ------------------------------------------------------------------------------

    def encode_pairs(self, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """(context tokens, continuation tokens) per request, exactly as TemplateLM.loglikelihood
        and _encode_pair make them, each distinct string encoded once."""
        split = []
        for ctx, cont in pairs:
            n = len(ctx) - len(ctx.rstrip())
            if n and ctx:
                ctx, cont = ctx[:-n], ctx[-n:] + cont
            split.append((ctx, cont))
        enc = self._encode_many({s for ctx, cont in split if ctx for s in (ctx, ctx + cont)})
        out = []
        for (ctx, cont), (orig_ctx, orig_cont) in zip(split, pairs, strict=True):
            if orig_ctx == "":
                # lm-eval conditions an empty context on the prefix token (BOS/EOS).
                cont_enc = self.tok_encode(orig_cont, add_special_tokens=False)
                out.append(([self.prefix_token_id], cont_enc) if self.prefix_token_id != cont_enc[0]
                           else (cont_enc[:1], cont_enc[1:]))
            elif not ctx:  # an all-whitespace context: rare, HFLM's own way
                out.append(self._encode_pair(orig_ctx, orig_cont))
            else:
                ctx_enc = enc[ctx]
                out.append((ctx_enc, enc[ctx + cont][len(ctx_enc):]))
        return out

    def _encode_many(self, strings: set[str]) -> dict[str, list[int]]:
        """tok_encode over many strings in batched tokenizer calls (same special-token rule)."""
        default = _add_special_kwargs(None, self.add_bos_token)
        bos = self.tokenizer.decode(self.prefix_token_id)
        plain, prefixed = [], []
        for s in strings:
            (prefixed if has_bos_prefix(s, bos) else plain).append(s)
        out = {}
        for group, kwargs in ((plain, default), (prefixed, {**default, "add_special_tokens": False})):
            if group:
                ids = self.tokenizer(group, **kwargs)["input_ids"]
                out.update(zip(group, ids, strict=True))
        return out

    # -- scoring -----------------------------------------------------------------------------------

    @functools.cached_property
    def _mask_kind(self) -> str | None:
        """How a custom 4D attention mask reaches this model's attention: "bool" (SDPA), "additive"
        (eager), or None where transformers cannot take one (flash / flex attention: HFLM's path)."""
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        impl = getattr(model.config, "_attn_implementation", None) or "eager"
        return {"sdpa": "bool", "eager": "additive"}.get(impl)

    def _packable(self, ctx: list[int], cont: list[int]) -> bool:
        """Scored by the shared-prefix path: a context of two tokens or more, within the model's window
        (HFLM truncates longer ones per request) and any sliding window (a custom mask bypasses it)."""
        window = getattr(self._text_config, "sliding_window", None)
        n = len(ctx) + len(cont)
        return len(ctx) >= 2 and 0 < len(cont) and n <= self.max_length + 1 and (not window or n <= window)

    def _shared_prefix_scores(self, encoded: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(encoded):
            groups.setdefault(tuple(ctx), []).append(i)
        # (prefix length, continuation tokens of all its choices, context, requests) per context.
        items = [(len(ctx) - 1, sum(len(encoded[i][1]) for i in members), ctx, members)
                 for ctx, members in groups.items()]
        # Buckets of packed-continuation length (x1.25 apart), longest prefix first within one: a batch
        # pads its prefixes and continuations little (padding the continuations to the batch's longest
        # choice was over half the work on the six-task suite). Largest first: an OOM shows at once.
        items.sort(key=lambda it: (-math.floor(math.log(it[1], 1.25)), -it[0]))
        logprob = torch.empty(len(encoded), dtype=torch.float64, device=self.device)
        greedy = torch.empty(len(encoded), dtype=torch.bool, device=self.device)
        cap = self.mc_batch_size or self.batch_size
        kv_bytes, logit_bytes = self._bytes_per_token
        start = 0
        while start < len(items):
            end, rows, lo, hi, qmax = start, 0, items[start][0], items[start][0], 0
            # A context joins while the batch's shortest prefix stays within mc_prefix_ratio of its
            # longest and the batch's KV cache plus logits (padded to its longest prefix and packed
            # continuation) fit the budget.
            while end < len(items):
                plen, q, _, members = items[end]
                n, lo2, hi2, q2 = rows + len(members), min(lo, plen), max(hi, plen), max(qmax, q)
                need = (end - start + 1) * (hi2 * kv_bytes + q2 * (kv_bytes + logit_bytes))
                fits = n <= cap and lo2 >= self.mc_prefix_ratio * hi2 and need <= self.mc_memory_bytes
                if end > start and not fits:
                    break
                rows, lo, hi, qmax, end = n, lo2, hi2, q2, end + 1
            batch = items[start:end]
            try:
                idx, lp, gr = self._score_batch(batch, encoded)
            except torch.cuda.OutOfMemoryError:
                if end - start == 1:
                    raise
                cap = max(1, rows // 2)
                torch.cuda.empty_cache()
                log.warning("out of memory at %d requests per batch; retrying with %d", rows, cap)
                continue
            logprob[idx] = lp.to(torch.float64)
            greedy[idx] = gr
            start = end
        return list(zip(logprob.tolist(), greedy.tolist(), strict=True))

    def _score_batch(self, batch, encoded):
        """Two forward passes for a batch of contexts: one over their prefixes (all tokens but the
        last; right-padded, so the causal mask alone is exact and no mask is built), and one over
        each context's choices packed into one row after its cached prefix. In that row each choice
        is its context's last token followed by the choice minus its last token, at the positions
        the whole sequence would have, and a 4D mask lets it see the prefix and its own earlier
        tokens only: the log-probabilities of HFLM's one pass per request, up to floating-point order,
        without copying the prefix's cache per choice or padding every choice to the longest."""
        dev = self.device
        plen = -(-max(it[0] for it in batch) // 16) * 16  # widths rounded up: fewer shapes to cache
        qlen = -(-max(it[1] for it in batch) // 8) * 8
        prefix_ids, prefix_lens, inputs, targets, segments, positions, owner, req_idx = [], [], [], [], [], [], [], []
        for p, q, ctx, members in batch:
            prefix_ids.append(list(ctx[:-1]) + [0] * (plen - p))
            prefix_lens.append(p)
            row_in, row_tg, row_seg, row_pos, row_own = [], [], [], [], []
            for s, i in enumerate(members):
                cont = encoded[i][1]
                row_in += [ctx[-1], *cont[:-1]]
                row_tg += cont
                row_seg += [s] * len(cont)
                row_pos += range(p, p + len(cont))
                row_own += [len(req_idx)] * len(cont)
                req_idx.append(i)
            pad = qlen - q
            inputs.append(row_in + [0] * pad)
            targets.append(row_tg + [0] * pad)
            segments.append(row_seg + [-1] * pad)
            positions.append(row_pos + [p] * pad)
            owner.append(row_own + [-1] * pad)
        pin = dev.type == "cuda"
        prefix_ids, prefix_lens, inputs, targets, segments, positions, owner, req_idx = (
            (t.pin_memory() if pin else t).to(dev, non_blocking=True) for t in map(torch.tensor, (
                prefix_ids, prefix_lens, inputs, targets, segments, positions, owner, req_idx)))
        # Mask (contexts, 1, qlen, plen + qlen): the real prefix tokens, then the same choice up to here.
        # A padding position sees the prefix only (a row with nothing to see would be NaN).
        see_prefix = torch.arange(plen, device=dev)[None, None, :] < prefix_lens[:, None, None]
        pos = torch.arange(qlen, device=dev)
        see_own = ((segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] >= 0)
                   & (pos[None, None, :] <= pos[None, :, None]))
        mask = torch.cat([see_prefix.expand(-1, qlen, -1), see_own], dim=2)[:, None]
        if self._mask_kind == "additive":
            mask = torch.zeros(mask.shape, device=dev).masked_fill_(~mask, torch.finfo(torch.float32).min)
        autocast = torch.autocast(device_type=dev.type, dtype=self.mixed_precision_dtype,
                                  enabled=self.mixed_precision_dtype is not None)
        with torch.no_grad(), autocast:
            out = self.model(input_ids=prefix_ids, use_cache=True, logits_to_keep=1)
            cache = getattr(out, "cache", None) or out.past_key_values
            logits = self.model(input_ids=inputs, attention_mask=mask, position_ids=positions, use_cache=True,
                                **{self._cache_kwarg: cache}).logits
        del cache, out
        logits, targets, owner = logits.flatten(0, 1), targets.flatten(), owner.flatten()
        valid = owner >= 0
        owner = owner.clamp(min=0)
        sums = torch.zeros(len(req_idx), dtype=torch.float32, device=dev)
        misses = torch.zeros(len(req_idx), dtype=torch.int32, device=dev)
        # log-softmax in slices of positions: its float32 copy of the logits stays small. Sums per
        # request by index_add: no GPU->CPU sync until the very end of the evaluation.
        for r in range(0, logits.shape[0], 4096):
            logp = F.log_softmax(logits[r:r + 4096], dim=-1, dtype=self.softmax_dtype)
            tgt, ok, own = targets[r:r + 4096], valid[r:r + 4096], owner[r:r + 4096]
            lp = logp.gather(1, tgt[:, None]).squeeze(1).float().masked_fill(~ok, 0)
            sums.index_add_(0, own, lp)
            misses.index_add_(0, own, ((logp.argmax(-1) != tgt) & ok).int())
        return req_idx, sums, misses == 0

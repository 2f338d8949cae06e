"""lm-eval's HF model class with a faster multiple-choice log-likelihood path (registered as "harness").

Everything but `loglikelihood` is lm-eval's HFLM (generation, rolling log-likelihood for perplexity,
tokenizer and model handling). Where HFLM re-encodes a document's context once per choice, pads each
request to the batch's longest, and moves per-request tensors to the CPU, this class:

- tokenizes each distinct string once, in one batched tokenizer call, with HFLM's own rules
  (trailing spaces moved to the continuation, the whole string encoded and split at the context's
  length, BOS handling);
- runs each distinct context once (all tokens but the last) and keeps its KV cache;
- scores every continuation of that context from the cache, in one batch: the input is the context's
  last token followed by the continuation minus its last token, at the positions the full sequence
  would have, so the log-probabilities are those of HFLM's single pass, up to floating-point order;
- does log-softmax, gather and the greedy check on the device, and copies two numbers per request to
  the CPU once at the end.

Requests the shared-prefix path cannot score exactly as HFLM does (a one-token context, or a context
plus continuation longer than the model's window, which HFLM truncates per request from the left) go
to HFLM's own `_loglikelihood_tokens`, as does everything on a seq2seq model or with several ranks.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix

log = logging.getLogger(__name__)


@register_model("harness")
class HarnessLM(HFLM):
    """HFLM whose multiple-choice path scores up to `mc_batch_size` requests (continuations; default
    `batch_size`) per pair of forward passes, and at most `mc_memory_bytes` of the batch's two big
    tensors: the KV cache copied per continuation and the continuations' logits (estimated from the
    model's config; default 8 GiB on CUDA, 2 GiB on CPU). Without that cap, 512 long continuations
    of a 49k-token vocabulary made the allocator reserve 135 GiB of an H200. On a CUDA out-of-memory
    error the cap halves and the batch is retried. `batch_size` stays HFLM's for everything else
    (rolling log-likelihood, generation)."""

    def __init__(self, *args, mc_batch_size: int | None = None, mc_memory_bytes: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.mc_batch_size = int(mc_batch_size) if mc_batch_size else None
        default = (8 if self.device.type == "cuda" else 2) * 2**30
        self.mc_memory_bytes = int(mc_memory_bytes) if mc_memory_bytes else default

    @functools.cached_property
    def _bytes_per_token(self) -> tuple[int, int]:
        """(KV-cache bytes per cached token, logits bytes per scored token), from the model's config."""
        cfg = self.model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        size = next(self.model.parameters()).element_size() if self.mixed_precision_dtype is None else 2
        size = max(size, 2)  # a 4-bit base computes in 16 or 32 bits
        heads = getattr(cfg, "num_attention_heads", 1)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv = cfg.num_hidden_layers * 2 * (getattr(cfg, "num_key_value_heads", None) or heads) * head_dim * size
        return kv, cfg.vocab_size * size

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if (self.enable_thinking or self.backend != "causal" or self.world_size > 1
                or not isinstance(self.batch_size, int)):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        pairs = [req.args for req in requests]
        encoded = self.encode_pairs(pairs)
        shared, stock = [], []
        for i, (ctx, cont) in enumerate(encoded):
            fits = len(ctx) >= 2 and 0 < len(cont) and len(ctx) + len(cont) <= self.max_length + 1
            (shared if fits else stock).append(i)
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

    def _shared_prefix_scores(self, encoded: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(encoded):
            groups.setdefault(tuple(ctx), []).append(i)
        # Longest first (like HFLM): an out-of-memory error shows at once, and batches pad little.
        order = sorted(groups.items(), key=lambda kv: (-len(kv[0]), -max(len(encoded[i][1]) for i in kv[1])))
        logprob = torch.empty(len(encoded), dtype=torch.float64, device=self.device)
        greedy = torch.empty(len(encoded), dtype=torch.bool, device=self.device)
        cap = self.mc_batch_size or self.batch_size
        kv_bytes, logit_bytes = self._bytes_per_token
        start = 0
        while start < len(order):
            end, rows, longest, klen = start, 0, len(order[start][0]), 0
            # Length buckets: a context under 3/4 of the batch's longest starts a new batch, so
            # padding stays under a quarter of the prefix tokens. Rows are padded to the batch's
            # longest prefix and continuation: that is what the memory estimate counts.
            while end < len(order):
                members = order[end][1]
                k = max(klen, *(len(encoded[i][1]) for i in members))
                n = rows + len(members)
                fits = (n <= cap and 4 * len(order[end][0]) >= 3 * longest
                        and n * (longest * kv_bytes + k * logit_bytes) <= self.mc_memory_bytes)
                if end > start and not fits:
                    break
                rows, klen, end = n, k, end + 1
            batch = order[start:end]
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
        """One forward over the contexts' prefixes, one over all their continuations from the cache."""
        dev = self.device
        prefixes = [list(ctx[:-1]) for ctx, _ in batch]
        # Widths rounded up (padding is masked): fewer distinct shapes for the allocator to cache.
        plen = -(-max(len(p) for p in prefixes) // 16) * 16
        prefix_ids = torch.tensor([p + [0] * (plen - len(p)) for p in prefixes])
        prefix_mask = torch.tensor([[1] * len(p) + [0] * (plen - len(p)) for p in prefixes])
        rows, row_group, req_idx = [], [], []
        for g, (ctx, members) in enumerate(batch):
            for i in members:
                rows.append((ctx[-1], encoded[i][1]))
                row_group.append(g)
                req_idx.append(i)
        klen = -(-max(len(cont) for _, cont in rows) // 8) * 8
        # Row: the context's last token, then the continuation but its last token; targets: the continuation.
        inputs = torch.tensor([[last] + cont[:-1] + [0] * (klen - len(cont)) for last, cont in rows])
        targets = torch.tensor([cont + [0] * (klen - len(cont)) for _, cont in rows])
        row_mask = torch.tensor([[1] * len(cont) + [0] * (klen - len(cont)) for _, cont in rows])
        positions = torch.tensor([len(p) for p in prefixes])[row_group][:, None] + torch.arange(klen)
        row_group = torch.tensor(row_group)
        req_idx = torch.tensor(req_idx)
        pin = dev.type == "cuda"
        prefix_ids, prefix_mask, inputs, targets, row_mask, positions, row_group, req_idx = (
            (t.pin_memory() if pin else t).to(dev, non_blocking=True)
            for t in (prefix_ids, prefix_mask, inputs, targets, row_mask, positions, row_group, req_idx))
        autocast = torch.autocast(device_type=dev.type, dtype=self.mixed_precision_dtype,
                                  enabled=self.mixed_precision_dtype is not None)
        with torch.no_grad(), autocast:
            out = self.model(input_ids=prefix_ids, attention_mask=prefix_mask, use_cache=True, logits_to_keep=1)
            cache = getattr(out, "cache", None) or out.past_key_values
            cache.reorder_cache(row_group)  # one copy of its context's cache per continuation
            logits = self.model(input_ids=inputs, attention_mask=torch.cat([prefix_mask[row_group], row_mask], 1),
                                position_ids=positions, use_cache=True, **{self._cache_kwarg: cache}).logits
        del cache, out
        valid = row_mask.bool()
        sums, greedy = [], []
        # log-softmax in slices of rows: its float32 copy of the logits stays small.
        step = max(1, 4096 // logits.shape[1])
        for r in range(0, logits.shape[0], step):
            logp = F.log_softmax(logits[r:r + step], dim=-1, dtype=self.softmax_dtype)
            tgt, ok = targets[r:r + step], valid[r:r + step]
            sums.append(logp.gather(2, tgt.unsqueeze(-1)).squeeze(-1).masked_fill(~ok, 0).sum(1))
            greedy.append(((logp.argmax(-1) == tgt) | ~ok).all(1))
        return req_idx, torch.cat(sums), torch.cat(greedy)

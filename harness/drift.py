"""Distribution drift: mean per-token KL(base || arm) of next-token distributions on the same text.

    harness compare --task finance            (computed for every arm; kl.enabled=false turns it off)

Shenfeld et al. 2025 ("RL's Razor") found the forward KL between the fine-tuned and the base model on
the new task's inputs to predict forgetting (R^2 0.71 on LLMs), better than weight-change norms. Here it
is measured on two kinds of text: general text (the WikiText pages of the suite's perplexity task) and
the domain task's own evaluation prompts. Both models run over the same tokens, one document at a time
(its first `max_tokens` tokens); each position's full-vocabulary log-softmax is computed, KL summed, and
only two numbers per document are kept: the summed KL and the token count. The document-level
bootstrap of their ratio is in stats.weighted_mean_ci.
"""

from __future__ import annotations


def kl_per_document(base, arm, tokenizer, docs: list[tuple[int, str]], *, max_tokens: int) -> list[list]:
    """[[doc_id, summed KL in nats, tokens], ...]: KL(base || arm) at every position of each document."""
    import torch
    from tqdm.auto import tqdm

    out = []
    base.eval()
    arm.eval()
    with torch.inference_mode():
        for doc_id, text in tqdm(docs, desc="KL(base || arm)", leave=False, mininterval=5):
            ids = tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"][:max_tokens]
            if len(ids) < 1:
                out.append([doc_id, 0.0, 0])
                continue
            x = torch.tensor([ids])
            lp = _log_probs(base, x)
            lq = _log_probs(arm, x).to(lp.device)
            kl = (lp.exp() * (lp - lq)).sum(-1)  # per position, full vocabulary
            out.append([doc_id, float(kl.double().sum()), len(ids)])
    return out


def _log_probs(model, ids):
    import torch

    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device)).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def mean_kl(per_doc: list[list]) -> float:
    tokens = sum(d[2] for d in per_doc)
    return sum(d[1] for d in per_doc) / tokens if tokens else float("nan")

"""Shared pytest setup: deterministic, small, CPU-only, and the three tokenizers the product meets.

Tests use tiny models, which gain nothing from a second thread and crawl when another process holds the
cores, so torch runs single-threaded here.

Tokenizer-dependent tests run with the tiny world's tokenizer AND the genuine Qwen2.5 (pad == eos) and Qwen3
tokenizers (`thor_min.offline`, built offline from the shipped tokenizer.json): fences, digits and special
tokens split differently there (a closing fence is `` `` `` + `` `\\n ``). A module opts in by overriding its
`tokenizer` fixture with `any_tokenizer`'s parameters (see `TOKENIZERS`). Models for a 152k vocabulary are
trained with `fit_texts_exact`, which costs what a 100-token vocabulary costs.
"""

import math
import os
from functools import lru_cache

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(1)

TOKENIZERS = ("tiny", "qwen2.5", "qwen3")


@lru_cache(maxsize=None)
def tokenizer_named(name: str):
    """The tiny world's tokenizer ("tiny") or a genuine Qwen one ("qwen2.5", "qwen3"), built once per session."""
    if name == "tiny":
        from thor_min import tiny

        return tiny.build_tokenizer()
    from thor_min.offline import real_tokenizer

    return real_tokenizer(name)


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny world's byte-level BPE tokenizer (built once per test session)."""
    return tokenizer_named("tiny")


@pytest.fixture(scope="module", params=TOKENIZERS)
def any_tokenizer(request):
    """Each of the three tokenizers in turn (a module that overrides `tokenizer` with it runs three times)."""
    return tokenizer_named(request.param)


def fit_texts_exact(model, tokenizer, texts: list[str], *, steps: int = 300, lr: float = 1e-2) -> float:
    """Train a tied-embedding model to reproduce `texts` (+ EOS); return the final loss.

    Every embedding row of a token the texts never use is set to zero and stays zero, so each such token's logit
    is exactly 0 and the full-vocabulary softmax equals a softmax over the used tokens plus one class of logit
    log(number of unused tokens). Training computes only that, on a copy of the used rows (written back at the
    end): exact, and as cheap for a 152k vocabulary as for a tiny one. Greedy decoding then reproduces the texts.
    """
    rows = [tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id] for text in texts]
    used = torch.tensor(sorted({token for row in rows for token in row}))          # [U]
    embedding = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embedding, "fit_texts_exact needs tied embeddings"
    used_rows = torch.nn.Parameter(embedding.detach()[used].clone())                # [U, H]
    unused_logit = math.log(embedding.shape[0] - len(used))     # logsumexp of the unused tokens' zero logits
    local = {int(token): index for index, token in enumerate(used)}
    width = max(len(row) for row in rows)
    local_ids = torch.zeros(len(rows), width, dtype=torch.long)                     # [B, T] indices into used
    targets = torch.full((len(rows), width), -100)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        local_ids[i, :len(row)] = torch.tensor([local[token] for token in row])
        attention[i, :len(row)], targets[i, :len(row) - 1] = 1, local_ids[i, 1:len(row)]
    torch.manual_seed(0)
    others = [p for p in model.parameters() if p is not embedding]
    optimizer = torch.optim.AdamW(others + [used_rows], lr=lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
    model.train()
    for _ in range(steps):
        hidden = model.model(inputs_embeds=used_rows[local_ids], attention_mask=attention).last_hidden_state
        logits = hidden @ used_rows.T                                                   # [B, T, U]
        logits = torch.cat([logits, logits.new_full((*logits.shape[:2], 1), unused_logit)], dim=-1)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        warmup.step()
    with torch.no_grad():
        embedding.zero_()
        embedding[used] = used_rows
    model.eval()
    return float(loss.detach())

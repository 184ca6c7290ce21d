"""Task accuracy beyond perplexity: LAMBADA (OpenAI) last-word prediction.

Each line of LAMBADA is a passage whose last word can only be guessed from the whole passage. As in
the SmoothQuant paper and lm-evaluation-harness (`lambada_openai`, metric `acc`): context = the text
up to its last space, target = " " + the last word; an example is correct iff greedy decoding
produces the target, i.e. every target token is the argmax of the model's prediction at its position
(one forward pass of context + target, no sampling).

The start of sequence follows data.py's `bos` protocols, per example: "auto" / "window" put the BOS
in front of each example when the tokenizer adds one (or always, for "window"); "stream" tokenizes
each example as the tokenizer does by default (an example is its own stream); "none" never adds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.data import DataError, read_documents, resolve_bos, tokenizer_adds_bos
from ..core.validate import ArgumentValueError, check_int, check_model, check_tokenizer, vocab_size

LAMBADA = "lambada"


@dataclass
class TaskResult:
    task: str
    metric: str  # "accuracy"
    value: float
    count: int  # examples scored
    correct: int
    bos: str  # the protocol used ("window", "stream" or "none")


@dataclass
class LambadaExample:
    input_ids: list[int]  # [BOS] + context + target tokens, as the model is fed them
    target_len: int  # the last `target_len` tokens of input_ids are the target


def split_last_word(text: str) -> tuple[str, str]:
    """(context, target): the text up to its last space, and " " + the last word. As lm-eval does,
    only the space character separates (in 7 of the 5153 lines the "word" holds a line break)."""
    text = text.rstrip()
    cut = text.rfind(" ")
    if cut <= 0:
        raise DataError(f"a LAMBADA line needs a context and a last word separated by a space, got {text[:60]!r}")
    return text[:cut], text[cut:]


def encode_example(tokenizer, context: str, target: str, prepend_bos: bool) -> LambadaExample:
    """Tokenize context + target in one piece (so the target's first token is the one the model
    sees after this context, as lm-eval does) and find where the context's tokens end."""
    whole = tokenizer(context + target, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    # the context's tokens normally are a prefix of the whole; where a merge crosses the boundary,
    # the target starts at the first token that differs
    shared = 0
    while shared < min(len(ctx), len(whole)) and ctx[shared] == whole[shared]:
        shared += 1
    shared = min(shared, len(whole) - 1)  # at least one target token
    if shared == 0:
        raise DataError(f"LAMBADA example with no context tokens: {context[:60]!r}")
    prefix = [tokenizer.bos_token_id] if prepend_bos else []
    return LambadaExample(prefix + whole, len(whole) - shared)


def lambada_examples(
    tokenizer, limit: int | None = None, bos: str = "auto", source: str = LAMBADA
) -> tuple[list[LambadaExample], str]:
    """The first `limit` (default all 5153) LAMBADA examples, tokenized, and the protocol used."""
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of examples, got {limit}")
    protocol = resolve_bos(tokenizer, bos)
    # an example is one short sequence: under "stream" it starts as the tokenizer starts any text
    prepend_bos = protocol == "window" or (protocol == "stream" and tokenizer_adds_bos(tokenizer))
    texts, _ = read_documents(source)
    texts = texts[:limit] if limit is not None else texts
    return [encode_example(tokenizer, *split_last_word(t), prepend_bos) for t in texts], protocol


@torch.no_grad()
def check_examples_fit(examples: list[LambadaExample], model: nn.Module) -> None:
    """Every token id of the tokenized passages is a row of the model's embedding: a tokenizer of
    another model would otherwise fail deep inside the embedding lookup."""
    vocab = vocab_size(model)
    top = max((max(e.input_ids) for e in examples if e.input_ids), default=-1)
    if vocab is not None and top >= vocab:
        raise ArgumentValueError(
            f"the LAMBADA passages tokenize to id {top}, but the model's vocabulary has {vocab} "
            "entries: pass the tokenizer that belongs to this model"
        )


def greedy_matches(
    model: nn.Module,
    examples: list[LambadaExample],
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool = True,
    desc: str = "lambada",
) -> list[bool]:
    """Per example, whether every target token is the model's argmax at its position. Examples are
    batched right-padded with an attention mask: a causal model's logits at the real positions do
    not depend on the padding after them."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # longest first, so each batch pads little and the first batch shows the peak memory
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    matches = [False] * len(examples)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, unit="batch"):
            batch = [examples[i] for i in order[start : start + batch_size]]
            width = max(len(e.input_ids) for e in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, e in enumerate(batch):
                ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
                mask[row, : len(e.input_ids)] = 1
            # the logits at position p predict token p + 1: the target tokens n-k..n-1 are predicted at
            # n-k-1..n-2; only those positions go through the LM head (on Gemma's 262k vocabulary the
            # head costs more than the whole body)
            wanted = sorted(
                {p for e in batch for p in range(len(e.input_ids) - e.target_len - 1, len(e.input_ids) - 1)}
            )
            predicted, column = _argmax_at(model, ids.to(device), mask.to(device), wanted)
            for row, (i, e) in enumerate(zip(order[start : start + batch_size], batch)):
                n = len(e.input_ids)
                guess = predicted[row, [column[p] for p in range(n - e.target_len - 1, n - 1)]]
                matches[i] = guess.tolist() == e.input_ids[n - e.target_len :]
    finally:
        model.train(was_training)
    return matches


def _argmax_at(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: list[int]):
    """The argmax token at `positions` of every row, and {position: column of the result}. Asks the
    model for those positions' logits only (`logits_to_keep`, transformers' generation models);
    models without that argument compute all logits and are indexed here."""
    try:
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            use_cache=False,
            logits_to_keep=torch.tensor(positions, device=ids.device),
        ).logits
    except TypeError:  # a model whose forward has no logits_to_keep
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, positions]
    return logits.argmax(-1).cpu(), {p: c for c, p in enumerate(positions)}


def lambada_accuracy(
    model: nn.Module,
    tokenizer,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    bos: str = "auto",
    source: str = LAMBADA,
) -> TaskResult:
    """LAMBADA (OpenAI) last-word accuracy, greedy, on the first `limit` examples (default all)."""
    check_model("model", model)
    check_tokenizer("tokenizer", tokenizer)
    check_int("limit", limit, optional=True)
    check_int("batch_size", batch_size)
    examples, protocol = lambada_examples(tokenizer, limit, bos, source)
    check_examples_fit(examples, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out anyway
    matches = greedy_matches(model, examples, batch_size, pad_id, progress)
    correct = sum(matches)
    return TaskResult(LAMBADA, "accuracy", correct / len(matches), len(matches), correct, protocol)

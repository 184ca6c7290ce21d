"""LAMBADA last-word accuracy: the batched greedy check against a plain token-by-token loop, a
hand-made model whose answers are known, the BOS protocol per example, the real data file."""

import json
from types import SimpleNamespace

import pytest
import torch
from tiny import VOCAB, tiny_model, tiny_tokenizer

from smoothq.core import data
from smoothq.core.data import DataError
from smoothq.evaluation.tasks import (
    LambadaExample,
    encode_example,
    greedy_matches,
    lambada_accuracy,
    lambada_examples,
    split_last_word,
)


@pytest.fixture(scope="module")
def train_text(data_dir):
    return (data_dir / "wikitext2-train-first1MB.txt").read_text()[:100_000]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama").eval()


@torch.no_grad()
def reference_match(model, example: LambadaExample) -> bool:
    """Greedy decoding, one token at a time, from the context alone: correct iff each generated
    token is the target's."""
    ids = example.input_ids
    context = ids[: len(ids) - example.target_len]
    for expected in ids[len(context) :]:
        logits = model(input_ids=torch.tensor([context])).logits[0, -1]
        if logits.argmax().item() != expected:
            return False
        context = context + [expected]
    return True


@torch.no_grad()
def greedy_continuation(model, context: list[int], n: int) -> list[int]:
    ids = list(context)
    for _ in range(n):
        ids.append(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item())
    return ids[len(context) :]


def test_split_last_word():
    assert split_last_word("He looked at the signs") == ("He looked at the", " signs")
    # as lm-eval: split at the last space character (7 of the 5153 targets start after a line break)
    assert split_last_word("He looked at the\nsigns") == ("He looked at", " the\nsigns")
    assert split_last_word("a b c  ") == ("a b", " c")
    with pytest.raises(DataError, match="a context and a last word"):
        split_last_word("word")


def test_batched_greedy_check_matches_a_plain_loop(model):
    """Examples of different lengths, some whose target is the model's own greedy continuation
    (correct), some with one target token changed (wrong: first, middle or last)."""
    gen = torch.Generator().manual_seed(0)
    examples, expected = [], []
    for i in range(12):
        context = torch.randint(3, VOCAB, (int(torch.randint(3, 15, (1,), generator=gen)),), generator=gen).tolist()
        target = greedy_continuation(model, context, 1 + i % 3)
        if i % 2:  # spoil one token of the target
            j = (i // 2) % len(target)
            target[j] = 3 + (target[j] + 1 - 3) % (VOCAB - 3)
        examples.append(LambadaExample(context + target, len(target)))
        expected.append(i % 2 == 0)
    reference = [reference_match(model, e) for e in examples]
    assert reference == expected
    for batch_size in (1, 5, 12):
        assert greedy_matches(model, examples, batch_size=batch_size, progress=False) == reference


class NextWordModel(torch.nn.Module):
    """Hand-made: always predicts token id + 1 (the next word of a counting vocabulary)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.unused = torch.nn.Parameter(torch.zeros(1))  # a device to read

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=torch.nn.functional.one_hot((input_ids + 1) % self.vocab, self.vocab).float())


def word_tokenizer(words: list[str], add_bos: bool):
    """Whole-word tokenizer: ids 0, 1 = <pad>, <s>; then the words in order."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>")


@pytest.mark.parametrize("add_bos", [False, True])
def test_hand_made_model_gets_exactly_the_counting_lines_right(tmp_path, add_bos):
    words = ["zero", "one", "two", "three", "four", "five", "six"]
    lines = [
        "one two three",
        "two three five",
        "zero one two three four",
        "four five four",
        "five six",
        "three four two",
    ]
    path = tmp_path / "lines.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    tok = word_tokenizer(words, add_bos)
    result = lambada_accuracy(NextWordModel(len(words) + 2), tok, batch_size=4, progress=False, source=str(path))
    assert (result.correct, result.count, result.value) == (3, 6, 0.5)
    assert result.bos == ("window" if add_bos else "stream")
    examples, _ = lambada_examples(tok, limit=2, source=str(path))
    assert examples[0].input_ids == [1] * add_bos + [3, 4, 5] and examples[0].target_len == 1
    # a BOS would be predicted to be followed by id 2 ("zero"): the first line stays right either way
    assert lambada_accuracy(NextWordModel(len(words) + 2), tok, limit=1, progress=False, source=str(path)).value == 1


def test_each_example_gets_the_bos_protocol(train_text):
    bos_tok = tiny_tokenizer(train_text, add_bos=True)
    plain_tok = tiny_tokenizer(train_text)
    for tok, bos, has_bos in [
        (bos_tok, "auto", True),
        (bos_tok, "window", True),
        (bos_tok, "stream", True),
        (bos_tok, "none", False),
        (plain_tok, "auto", False),
        (plain_tok, "window", True),
        (plain_tok, "none", False),
    ]:
        examples, _ = lambada_examples(tok, limit=3, bos=bos)
        assert all((e.input_ids[0] == tok.bos_token_id) == has_bos for e in examples), (bos, has_bos)
        assert all(tok.bos_token_id not in e.input_ids[1:] for e in examples)
    with pytest.raises(DataError, match="bos must be one of"):
        lambada_examples(plain_tok, limit=3, bos="yes")


def test_targets_are_the_last_word_tokenized_in_context(train_text):
    tok = tiny_tokenizer(train_text)
    examples, protocol = lambada_examples(tok, limit=20)
    assert protocol == "stream" and len(examples) == 20
    with (data.data_dir() / "lambada_openai_test.jsonl").open() as f:
        first = json.loads(f.readline())["text"]
    assert first.endswith(" signs")
    e = examples[0]
    assert tok.decode(e.input_ids[-e.target_len :]) == " signs"
    assert e.input_ids == tok(first).input_ids  # context + target in one piece, as tokenized whole
    one = encode_example(tok, "about", " signs", prepend_bos=False)
    assert tok.decode(one.input_ids[-one.target_len :]) == " signs"
    with pytest.raises(DataError, match="positive number of examples"):
        lambada_examples(tok, limit=0)


def test_lambada_accuracy_on_a_tiny_random_model(model, train_text):
    tok = tiny_tokenizer(train_text)
    r = lambada_accuracy(model, tok, limit=8, batch_size=3, progress=False)
    examples, _ = lambada_examples(tok, limit=8)
    assert r.count == 8 and r.correct == sum(reference_match(model, e) for e in examples)
    assert r.value == r.correct / 8 and r.task == "lambada" and r.metric == "accuracy"

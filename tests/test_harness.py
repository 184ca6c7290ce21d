"""lm-evaluation-harness bridge (smoothq.evaluation.harness), offline: tasks built from local files, run on a
tiny random model through our adapter, checked against log-likelihoods computed here by hand, on
the float model and on its naive W8A8 quantization; the CLI; the missing-dataset error."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

pytest.importorskip("lm_eval")

import smoothq as sq  # noqa: E402
from smoothq.cli.app import main  # noqa: E402
from smoothq.core.data import DataError  # noqa: E402
from smoothq.evaluation.harness import evaluate_harness, load_tasks, local_task_config, run_harness  # noqa: E402
from smoothq.evaluation.tasks import lambada_examples  # noqa: E402

# labels: half point at a one-word choice (a random model favours few tokens), half at a longer one
QUESTIONS = [
    ("The capital of France is", ["Paris", "a small dog", "blue", "the river Thames"], 2),
    ("Water boils at a temperature of", ["ten apples", "100 degrees", "the moon", "never"], 1),
    ("In the year 1990 the team played", ["green", "at home", "its first match in the league", "seven"], 0),
    ("She opened the door and saw", ["nothing", "a letter on the floor", "the", "her brother standing there"], 3),
    ("The album was released in", ["the United States", "1997", "a box", "tomorrow morning"], 1),
    ("He was born in a small town", ["near the coast", "of", "and grew up there", "which"], 2),
    ("The game received positive reviews", ["from critics", "blue", "under the sea", "and"], 3),
    ("After the war , the building", ["was", "became a museum", "sang", "of the"], 1),
]

MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No Hub: what lm-eval and datasets would download fails at once."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


@pytest.fixture(scope="module")
def tok(data_dir):
    return tiny_tokenizer((data_dir / "wikitext2-train-first1MB.txt").read_text()[:100_000])


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama").eval()


@pytest.fixture(scope="module")
def qmodel(model):
    q = sq.quantize(copy.deepcopy(model), "W8A8")  # naive W8A8: no smoothing, dynamic per-token activations
    assert any(isinstance(m, sq.W8A8Linear) for m in q.modules())
    return q


@pytest.fixture
def task_dir(tmp_path):
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n" for q, c, y in QUESTIONS))
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "tiny_mc.yaml").write_text(MC_YAML.format(data=data, cache=tmp_path / "cache"))
    return d


@torch.no_grad()
def loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), one unpadded sequence: the tokens of context +
    continuation as one text, the continuation being those after the context's own tokens."""
    whole = tok(context + continuation).input_ids
    n = len(tok(context).input_ids)
    logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(n, len(whole)))


def reference_mc(model, tok) -> tuple[list[list[float]], float]:
    lls = [[loglikelihood(model, tok, q, " " + c) for c in choices] for q, choices, _ in QUESTIONS]
    correct = [max(range(len(ll)), key=ll.__getitem__) == y for ll, (_, _, y) in zip(lls, QUESTIONS)]
    return lls, sum(correct) / len(correct)


def harness_mc(model, tok, task_dir, batch_size=3):
    results = run_harness(model, tok, ["tiny_mc"], include_path=str(task_dir), batch_size=batch_size, log_samples=True)
    samples = sorted(results["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    lls = [[r[0][0] for r in s["resps"]] for s in samples]
    return results, lls


@pytest.mark.parametrize("which", ["float", "w8a8"])
def test_multiple_choice_accuracy_equals_a_plain_computation(model, qmodel, tok, task_dir, which):
    m = model if which == "float" else qmodel
    ref_lls, ref_acc = reference_mc(m, tok)
    assert 0 < ref_acc < 1  # the random model gets some right and some wrong: the check can fail
    results, lls = harness_mc(m, tok, task_dir)
    assert torch.allclose(torch.tensor(lls), torch.tensor(ref_lls), atol=1e-4, rtol=0)
    rows = [
        r
        for r in evaluate_harness(m, tok, ["tiny_mc"], include_path=str(task_dir), batch_size=5)
        if r["metric"] == "acc"
    ]
    assert len(rows) == 1
    row = rows[0]
    assert row["task"] == "tiny_mc" and row["value"] == ref_acc and row["count"] == len(QUESTIONS)
    assert row["fewshot"] == 0
    p = ref_acc
    assert row["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (len(QUESTIONS) - 1)))
    if which == "w8a8":  # it is the quantized model the harness scored, not the float one
        float_lls, _ = reference_mc(model, tok)
        assert (torch.tensor(lls) - torch.tensor(float_lls)).abs().max() > 1e-3


def test_limit_and_fewshot(model, tok, task_dir):
    results = run_harness(model, tok, ["tiny_mc"], include_path=str(task_dir), limit=3, num_fewshot=2, log_samples=True)
    assert results["n-samples"]["tiny_mc"]["effective"] == 3 and results["n-shot"]["tiny_mc"] == 2
    # two solved examples (from the same split, as lm-eval does without a fewshot split) before each question
    context = results["samples"]["tiny_mc"][0]["arguments"][0][0]
    assert context.count("\n\n") == 2


def test_shipped_lambada_task_is_the_stock_one_on_local_data(model, tok, data_dir):
    import lm_eval
    import yaml

    cfg = local_task_config("lambada_openai_local")
    stock = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "lambada" / "lambada_openai.yaml").read_text())
    for key in ("doc_to_text", "doc_to_target", "output_type", "test_split", "metric_list"):
        assert cfg[key] == stock[key], key
    assert cfg["dataset_path"] == "json"
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str(data_dir / "lambada_openai_test.jsonl")
    # its last-word perplexity and accuracy on 6 passages = ours, computed from smoothq.evaluation.tasks' examples
    rows = {r["metric"]: r for r in evaluate_harness(model, tok, ["lambada_openai_local"], limit=6, batch_size=4)}
    examples, _ = lambada_examples(tok, limit=6)
    lls, greedy = [], []
    with torch.no_grad():
        for e in examples:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            lp = torch.log_softmax(logits.float(), -1)
            n = len(e.input_ids)
            lls.append(sum(lp[i - 1, e.input_ids[i]].item() for i in range(n - e.target_len, n)))
            greedy.append(logits[n - e.target_len - 1 : n - 1].argmax(-1).tolist() == e.input_ids[n - e.target_len :])
    assert rows["perplexity"]["value"] == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=1e-4)
    assert rows["acc"]["value"] == sum(greedy) / len(greedy) and rows["acc"]["count"] == 6


def test_cli_writes_the_rows(model, tok, task_dir, tmp_path, capsys):
    q = sq.quantize(copy.deepcopy(model), "W8A8")
    sq.save(q, tmp_path / "ckpt", tok)
    out = tmp_path / "rows.json"
    rc = main(
        [
            "-q",
            "eval",
            str(tmp_path / "ckpt"),
            "--lm-eval",
            "tiny_mc",
            "--lm-eval-include",
            str(task_dir),
            "--lm-eval-batch-size",
            "4",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    loaded, loaded_tok = sq.load(tmp_path / "ckpt")
    _, ref_acc = reference_mc(loaded, loaded_tok)
    doc = json.loads(out.read_text())
    assert doc["scheme"] == "W8A8" and doc["rows"] == []  # --lm-eval alone: no perplexity task
    (row,) = doc["lm_eval"]["rows"]
    assert (row["task"], row["metric"], row["count"]) == ("tiny_mc", "acc", len(QUESTIONS))
    assert row["value"] == ref_acc
    table = capsys.readouterr().out
    assert "| tiny_mc | 0 | 8 | acc |" in table and table.strip().splitlines()[-1].endswith(f"| {ref_acc:.4f} |")


def test_missing_dataset_is_one_line_naming_the_task(tmp_path, capsys):
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: smoothq-tests/not-local\noutput_type: "
        "loglikelihood\ntest_split: test\ndoc_to_text: '{{a}}'\ndoc_to_target: '{{b}}'\n"
    )
    with pytest.raises(DataError, match="lm-eval task 'hub_task': its dataset could not be loaded .*Hugging Face Hub"):
        load_tasks(["hub_task"], str(d))
    assert main(["eval", "--lm-eval", "hub_task", "--lm-eval-include", str(d)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'hub_task'" in err[0] and "--lm-eval-include DIR" in err[0]


def test_without_lm_eval_it_says_how_to_install_it(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    assert main(["eval", "--lm-eval", "hellaswag"]) == 2
    assert "pip install 'smoothq[lm-eval]'" in capsys.readouterr().err


def test_flags_need_lm_eval(capsys):
    assert main(["eval", "--lm-eval-limit", "3"]) == 2
    assert "add --lm-eval TASKS" in capsys.readouterr().err


def test_registered_model_type_loads_a_checkpoint(model, tok, task_dir, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model

    sq.save(sq.quantize(copy.deepcopy(model), "W8A8"), tmp_path / "ckpt", tok)
    lm = get_model("smoothq").create_from_arg_string(
        f"pretrained={tmp_path / 'ckpt'}", {"batch_size": 4, "device": None}
    )
    assert any(isinstance(m, sq.W8A8Linear) for m in lm.model.modules())
    tasks = load_tasks(["tiny_mc"], str(task_dir))
    acc = simple_evaluate(lm, tasks=tasks.objects, task_manager=tasks.manager)["results"]["tiny_mc"]["acc,none"]
    loaded, loaded_tok = sq.load(tmp_path / "ckpt")
    assert acc == reference_mc(loaded, loaded_tok)[1]


def test_the_model_is_scored_as_held_not_re_tied(tok, task_dir):
    """HFLM calls tie_weights(): on a model whose config says tied but whose lm_head is its own
    tensor (as loaded), that would score another model. The adapter leaves it as it is."""
    m = tiny_model("llama", seed=1).eval()
    m.config.tie_word_embeddings = True
    head = m.lm_head.weight
    _, ref_acc = reference_mc(m, tok)
    (row,) = [r for r in evaluate_harness(m, tok, ["tiny_mc"], include_path=str(task_dir)) if r["metric"] == "acc"]
    assert m.lm_head.weight is head and m.lm_head.weight is not m.model.embed_tokens.weight
    assert "tie_weights" not in vars(m) and row["value"] == ref_acc

"""smoothq's LAMBADA against lm-evaluation-harness's lambada_openai, example by example.

    python benchmarks/accuracy/lm_eval_lambada.py                  # SmolLM2-135M, first 500 passages
    python benchmarks/accuracy/lm_eval_lambada.py --limit 5153 --model gemma3-270m

Both score the local lambada_openai_test.jsonl: smoothq.evaluation.tasks (`smoothq eval --task lambada`) and
lm-eval's own `lambada_openai` task pointed at that file (`lambada_openai_local`, `smoothq eval
--lm-eval lambada_openai_local`), on the float model and on its naive W8A8 quantization (no
smoothing, backend auto), in one process on the same module. Also counts the passages that the two
tokenize differently (lm-eval: context tokens = tokenize(context), target = the rest of
tokenize(context + target); smoothq: the shared prefix).

Writes benchmarks/results/lm-eval-lambada-<model>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

import smoothq as sq
from smoothq.core.data import read_documents
from smoothq.evaluation.harness import run_harness, wrap
from smoothq.evaluation.tasks import greedy_matches, lambada_examples, split_last_word

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def main() -> None:
    import lm_eval

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()

    model, tok = sq.load_model(args.model)
    texts = read_documents("lambada")[0][: args.limit]
    examples, bos = lambada_examples(tok, limit=args.limit)
    lm = wrap(model, tok)
    tok_diff = sum(
        ctx + cont != e.input_ids or len(cont) != e.target_len
        for ctx, cont, e in ((*lm._encode_pair(*split_last_word(t)), e) for t, e in zip(texts, examples))
    )
    out = {
        "model": args.model,
        "limit": args.limit,
        "bos": bos,
        "tokenization_differs": tok_diff,
        "lm_eval": lm_eval.__version__,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "rows": [],
    }
    for name in ["fp32", "W8A8 naive"]:
        m = model if name == "fp32" else sq.quantize(copy.deepcopy(model), "W8A8")
        t0 = time.time()
        ours = greedy_matches(m, examples, batch_size=args.batch_size, progress=False)
        t_ours = time.time() - t0
        t0 = time.time()
        res = run_harness(
            m, tok, ["lambada_openai_local"], limit=args.limit, batch_size=args.batch_size, log_samples=True
        )
        t_lm = time.time() - t0
        samples = sorted(res["samples"]["lambada_openai_local"], key=lambda s: s["doc_id"])
        theirs = [bool(s["acc"]) for s in samples]
        r = res["results"]["lambada_openai_local"]
        row = {
            "model": name,
            "smoothq_acc": sum(ours) / len(ours),
            "lm_eval_acc": r["acc,none"],
            "lm_eval_acc_stderr": r["acc_stderr,none"],
            "lm_eval_perplexity": r["perplexity,none"],
            "examples_disagree": sum(a != b for a, b in zip(ours, theirs)),
            "seconds_smoothq": round(t_ours, 1),
            "seconds_lm_eval": round(t_lm, 1),
        }
        out["rows"].append(row)
        print(row, flush=True)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"lm-eval-lambada-{args.model}"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        f"# LAMBADA: smoothq vs lm-eval lambada_openai ({args.model})",
        "",
        f"Command: `python benchmarks/accuracy/lm_eval_lambada.py --model {args.model} --limit {args.limit}` "
        f"(lm-eval {out['lm_eval']}, torch {out['torch']}).",
        "",
        f"First {args.limit} passages of lambada_openai_test.jsonl, bos={bos}; passages tokenized differently "
        f"by the two: {tok_diff}. Seconds are wall time on a shared 2-core CPU (other jobs running).",
        "",
        "| model | smoothq acc | lm-eval acc | lm-eval stderr | lm-eval perplexity | examples that disagree "
        "| seconds smoothq | seconds lm-eval |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['smoothq_acc']:.4f} | {r['lm_eval_acc']:.4f} | {r['lm_eval_acc_stderr']:.4f} | "
        f"{r['lm_eval_perplexity']:.3f} | {r['examples_disagree']} | {r['seconds_smoothq']} | "
        f"{r['seconds_lm_eval']} |"
        for r in out["rows"]
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

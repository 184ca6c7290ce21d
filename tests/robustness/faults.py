"""Fault injection at any point of a layered run, for tests/robustness/test_kill_anywhere.py.

A point is the n-th event of the run: a call of a smoothq function, or a call of an `os` function
(pwrite, fsync, replace, unlink, ...: every write, flush and rename the run makes), counted by a
profile hook. A counting pass labels each event with the stage it belongs to (the layered
executor's function it runs under), so points can be drawn at random inside each stage.

Run as a script (`python faults.py CONFIG.json RESULT.json`) it is a fork server: it imports torch,
transformers and smoothq once, never computes, and forks one child per run (a fork after a
parallel torch computation can hang OpenMP; a fresh interpreter per run costs seconds of imports):
the uninterrupted reference, the counting passes, and for each point a child SIGKILLed there, then
a child that resumes. The result lists, per point, where it was killed, what was on disk right
after the kill, and what the resumed run left.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sys
import traceback
from pathlib import Path

import smoothq

ROOT = str(Path(smoothq.__file__).parent)
LAYERED = os.path.join(ROOT, "pipeline", "layered", "")
# the layered executor's functions, by the stage they are (the innermost one an event runs under)
STAGES = {
    "open_work_dir": "work directory",
    "embeddings_pass": "calibration",
    "calibrate": "calibration",
    "smooth": "smoothing",
    "start_writer": "shard writes",
    "write_outside": "shard writes",
    "write_layer": "shard writes",
    "commit_layer": "layer commit",
    "finish": "final rename",
}


def stage_of(frame) -> str:
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith(LAYERED) and code.co_name in STAGES:
            return STAGES[code.co_name]
        frame = frame.f_back
    return "other"


def where(frame) -> str:
    code = frame.f_code
    return f"{Path(code.co_filename).name}:{code.co_name}"


class Injector:
    """A profile hook (sys.setprofile) counting the run's events; at event `at` it calls `fault`
    with the frame. `labels`, if a list, receives each event's stage (the counting pass)."""

    def __init__(self, at: int | None = None, fault=None, labels: list | None = None, wheres: list | None = None):
        self.n, self.at, self.fault, self.labels, self.wheres = 0, at, fault, labels, wheres

    def __call__(self, frame, event, arg):
        if event == "call":
            if not frame.f_code.co_filename.startswith(ROOT):
                return
        elif event == "c_call":
            if getattr(arg, "__module__", None) != "posix":  # os.* : the run's writes, syncs, renames
                return
        else:
            return
        self.n += 1
        if self.labels is not None:
            self.labels.append(stage_of(frame))
        if self.wheres is not None:
            self.wheres.append(f"os.{arg.__name__} in {where(frame)}" if event == "c_call" else where(frame))
        if self.n == self.at:
            self.fault(frame, arg if event == "c_call" else None)


def injected(function, injector: Injector):
    sys.setprofile(injector)
    try:
        return function()
    finally:
        sys.setprofile(None)


def draw_points(labels: list[str], stages: dict[str, int], seed: int) -> list[tuple[int, str]]:
    """`stages[s]` event numbers drawn at random (seeded) among the events of stage s."""
    rng = random.Random(seed)
    points = []
    for stage, count in stages.items():
        events = [i + 1 for i, label in enumerate(labels) if label == stage]
        assert len(events) >= count, f"only {len(events)} events in stage {stage!r}"
        points += [(n, stage) for n in sorted(rng.sample(events, count))]
    return points


def digest(folder: Path) -> str | None:
    """sha256 of a directory's file names and bytes (None if it does not exist)."""
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def siblings(out: Path) -> list[str]:
    """What lies next to `out` besides it (temp, partial, old and lock entries of its writers)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


# ---------------------------------------------------------------------------------------------
# the fork server


def _in_child(body) -> int:
    """Run body() in a forked child; its exit status (negative: killed by that signal)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            body()
        except BaseException:  # noqa: BLE001 - reported through the exit status and stderr
            traceback.print_exc()
            code = 3
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def serve(config: dict) -> dict:
    import torch
    from transformers import AutoTokenizer

    from smoothq.pipeline.layered import quantize_sequential

    src, base = Path(config["src"]), Path(config["base"])
    ids = torch.load(config["ids"])
    tokenizer = AutoTokenizer.from_pretrained(src)
    settings = {**config["settings"], "tokenizer": tokenizer, "progress": False}

    def run(out: Path, **kw):
        return lambda: quantize_sequential(src, out, ids, **{**settings, **kw})

    result: dict = {"points": []}
    assert _in_child(run(base / "ref" / "out")) == 0
    result["reference"] = digest(base / "ref" / "out")
    assert _in_child(run(base / "old" / "out", alpha=0.8)) == 0  # an earlier checkpoint, to be replaced
    old = digest(base / "old" / "out")
    result["old"] = old

    points = []
    for replacing in (False, True):  # into a new output, and over an existing checkpoint (--force)
        labels_file = base / f"labels-{replacing}.json"
        count_dir = base / f"count-{replacing}"

        def count(count_dir=count_dir, labels_file=labels_file, replacing=replacing):
            count_dir.mkdir()  # as each point's run finds it: the same events
            if replacing:
                shutil.copytree(base / "old" / "out", count_dir / "out")
            labels: list[str] = []
            wheres: list[str] = []
            injected(run(count_dir / "out", overwrite=replacing), Injector(labels=labels, wheres=wheres))
            labels_file.write_text(json.dumps([labels, wheres]))

        assert _in_child(count) == 0
        labels, wheres = json.loads(labels_file.read_text())
        result[f"events_{'replacing' if replacing else 'new'}"] = len(labels)
        stages = config["stages_replacing"] if replacing else config["stages_new"]
        points += [(n, stage, replacing) for n, stage in draw_points(labels, stages, config["seed"])]
        for named in config.get("named_points", []):  # a precise instant, e.g. between two renames
            if named["replacing"] == replacing:
                events = [i + 1 for i, w in enumerate(wheres) if w == named["where"]]
                n = events[named["occurrence"] - 1]
                points.append((n, labels[n - 1], replacing))

    for k, (n, stage, replacing) in enumerate(points):
        out = base / f"p{k:02d}" / "out"
        out.parent.mkdir()
        if replacing:
            shutil.copytree(base / "old" / "out", out)
        killed_at = out.parent.parent / f"p{k:02d}-killed-at.txt"

        def kill(frame, c_function, killed_at=killed_at):
            what = f"os.{c_function.__name__} in {where(frame)}" if c_function is not None else where(frame)
            killed_at.write_text(what)
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind, as in a crash or an OOM kill

        status = _in_child(
            lambda out=out, kill=kill, n=n, replacing=replacing: injected(
                run(out, overwrite=replacing), Injector(at=n, fault=kill)
            )
        )
        after_kill = {"out": digest(out), "siblings": siblings(out)}
        olds = [digest(out.parent / s) for s in after_kill["siblings"] if ".old-" in s]
        resumed = _in_child(run(out, overwrite=replacing, resume=True))
        result["points"].append(
            {
                "event": n,
                "stage": stage,
                "replacing": replacing,
                "killed_at": killed_at.read_text() if killed_at.exists() else None,
                "kill_status": status,
                "out_after_kill": after_kill["out"],
                "old_aside_after_kill": olds,
                "siblings_after_kill": after_kill["siblings"],
                "resume_status": resumed,
                "out_after_resume": digest(out),
                "siblings_after_resume": siblings(out),
            }
        )
    return result


if __name__ == "__main__":
    config_file, result_file = sys.argv[1:3]
    Path(result_file).write_text(json.dumps(serve(json.loads(Path(config_file).read_text())), indent=1))

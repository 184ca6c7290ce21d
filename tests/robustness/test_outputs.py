"""Safe outputs (smoothq/formats/io.py): a save is all or nothing, --force replaces only our own checkpoint,
stale temp directories of killed saves are cleaned, files and directory are fsynced before the
rename, full and read-only disks are one clear error (real tmpfs mounts, no mocks of the disk),
and two runs with the same seed and thread count write identical bytes."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUICK
from tiny import tiny_model

import smoothq as sq
from smoothq.cli.app import main
from smoothq.formats import io
from smoothq.formats.io import OutputError


def _quantized(dtype=torch.float32):
    model = tiny_model("llama")
    sq.quantize(model, "W8A8")
    return model


def run(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------------
# full and read-only disks: real file systems


def test_real_full_disk_on_save_is_one_clear_error_and_leaves_nothing(tmpfs):
    disk = tmpfs(128)  # the float32 checkpoint of the tiny model is ~250 kB
    with pytest.raises(OutputError) as exc:
        io.save(_quantized(), disk / "out", float_dtype="float32")
    assert "disk full while writing" in str(exc.value) and "nothing was written there" in str(exc.value)
    assert list(disk.iterdir()) == []  # no partial output, no temp directory


def test_real_full_disk_through_the_cli_exits_2_and_leaves_nothing(capsys, model_src, tmpfs, monkeypatch, small_text):
    """The same with the preflight's space check switched off, so the write itself hits the full disk."""
    from smoothq.pipeline import preflight

    disk = tmpfs(128)
    monkeypatch.setattr(preflight, "check_disk", lambda *a, **k: None)
    rc, err = run(
        capsys,
        "-q",
        "quantize",
        str(model_src),
        *QUICK,
        "--calib",
        small_text,
        "--save-dtype",
        "float32",
        "-o",
        str(disk / "out"),
    )
    assert rc == 2 and "disk full while writing" in error_line(err) and "Traceback" not in err
    assert list(disk.iterdir()) == []


def test_real_read_only_location_on_save(tmpfs):
    ro = tmpfs(64, read_only=True)
    with pytest.raises(OutputError, match="read-only file system"):
        io.save(_quantized(), ro / "out")


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "write_metadata", interrupt)
    with pytest.raises(KeyboardInterrupt):
        io.save(_quantized(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# --force and what it may replace


def test_force_replaces_our_own_checkpoint(capsys, model_src, tmp_path, small_text):
    out = tmp_path / "out"
    assert (
        main(["-q", "quantize", str(model_src), *QUICK, "--calib", small_text, "--scheme", "W8A8", "-o", str(out)]) == 0
    )
    rc, err = run(
        capsys,
        "-q",
        "quantize",
        str(model_src),
        *QUICK,
        "--calib",
        small_text,
        "--scheme",
        "O3",
        "-o",
        str(out),
        "--force",
    )
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text())["smoothq"]["scheme"]["name"] == "O3"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or old directory left


def test_force_refuses_our_checkpoint_holding_other_files(capsys, model_src, tmp_path):
    out = tmp_path / "out"
    io.save(_quantized(), out)
    (out / "notes.md").write_text("mine")
    rc, err = run(capsys, "-q", "quantize", str(model_src), *QUICK, "-o", str(out), "--force")
    assert rc == 2 and "holds notes.md, which is not part of a smoothq checkpoint" in error_line(err)
    assert (out / "notes.md").read_text() == "mine"


def test_force_never_replaces_the_input_model(tmp_path):
    model = _quantized()
    io.save(model, tmp_path / "ckpt")
    with pytest.raises(OutputError, match="is the input model directory"):
        io.save(model, tmp_path / "ckpt", overwrite=True, sources=[tmp_path / "ckpt"])
    with pytest.raises(OutputError, match="contains the input model directory"):
        io.save(model, tmp_path, overwrite=True, sources=[tmp_path / "ckpt"])
    assert (tmp_path / "ckpt" / "config.json").is_file()


def test_sequential_output_inside_the_input_model_is_refused(capsys, src):
    rc, err = run(capsys, "-q", "quantize", str(src), "--sequential", *QUICK, "-o", str(src / "q"))
    assert rc == 2 and "is inside the input model directory" in error_line(err) and not (src / "q").exists()


def test_empty_directory_is_a_valid_output(tmp_path):
    (tmp_path / "out").mkdir()
    io.save(_quantized(), tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file()


# ---------------------------------------------------------------------------------------------
# temp directories of killed saves


def test_stale_temp_dirs_of_dead_saves_are_cleaned_only_ours(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".out.tmp-{dead.pid}-abc"
        running = tmp_path / f".out.tmp-{live.pid}-def"
        other = tmp_path / f".other.tmp-{dead.pid}-ghi"
        odd = tmp_path / ".out.tmp-notapid"
        for d in (stale, running, other, odd):
            d.mkdir()
            (d / "model.safetensors").write_bytes(b"half")
        io.save(_quantized(), tmp_path / "out")
        assert not stale.exists()  # a killed save's: removed
        assert running.exists() and other.exists() and odd.exists()  # a live save's, another output's, not ours
        assert (tmp_path / "out" / "config.json").is_file()
    finally:
        live.kill()
        live.wait()


def test_temp_dir_names_hold_the_pid(tmp_path, monkeypatch):
    seen = []
    real = io.write_metadata

    def spy(folder, *args, **kwargs):
        seen.append(folder.name)
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(io, "write_metadata", spy)
    io.save(_quantized(), tmp_path / "out")
    assert seen and seen[0].startswith(f".out.tmp-{os.getpid()}-")


def test_files_and_directory_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a), str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    io.save(_quantized(), tmp_path / "out")
    rename = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(tmp_path / "out"))
    tmp = events[rename][1]
    synced = {e[1] for e in events[:rename] if e[0] == "fsync"}
    for f in (tmp_path / "out").iterdir():
        assert f"{tmp}/{f.name}" in synced, f.name
    assert tmp in synced  # the directory itself
    assert ("fsync", str(tmp_path)) in events[rename:]  # and its parent after the rename


# ---------------------------------------------------------------------------------------------
# determinism


def test_same_seed_and_threads_give_identical_bytes(capsys, model_src, tmp_path, small_text):
    """Two runs (same recipe, seed and torch thread count) write byte-identical checkpoints."""
    threads = torch.get_num_threads()
    args = [
        "-q",
        "quantize",
        str(model_src),
        "--calib",
        small_text,
        "--samples",
        "4",
        "--calib-seqlen",
        "32",
        "--scheme",
        "O3",
        "--alpha",
        "0.5",
        "--smooth-extra",
        "all",
        "--seed",
        "3",
    ]
    assert main([*args, "-o", str(tmp_path / "a")]) == 0
    assert torch.get_num_threads() == threads
    assert main([*args, "-o", str(tmp_path / "b")]) == 0
    a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert a == b and "model.safetensors" in a and "config.json" in a


def test_safetensors_errors_are_recognized_by_their_os_error():
    """safetensors raises SafetensorError (not an OSError) with the OS error in its message."""
    import errno

    from safetensors import SafetensorError

    full = io.write_error(
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), Path("out")
    )
    assert isinstance(full, OutputError) and full.errno == errno.ENOSPC and "disk full while writing out" in str(full)
    ro = io.write_error(SafetensorError("I/O error: Read-only file system (os error 30)"), Path("out"))
    assert ro.errno == errno.EROFS and "read-only file system" in str(ro)
    assert io.write_error(ValueError("not an I/O error"), Path("out")) is None


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_modes_follow_the_umask(tmp_path, umask):
    """Readable like any model directory (a server running as another user loads it): the mode a
    plain mkdir / open would give, not mkdtemp's 0700."""
    before = os.umask(umask)
    try:
        out = io.save(_quantized(), tmp_path / "ckpt")
        with io.atomic_dir(tmp_path / "other") as tmp:  # the ONNX export and the inspect report write through it
            (tmp / "index.html").write_text("ok")
    finally:
        os.umask(before)
    for folder in (out, tmp_path / "other"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask, folder
        for f in folder.rglob("*"):
            want = (0o777 if f.is_dir() else 0o666) & ~umask
            assert f.stat().st_mode & 0o777 == want, f


def test_layered_checkpoint_modes_follow_the_umask(model_src, tmp_path, capsys):
    before = os.umask(0o022)
    try:
        rc, err = run(capsys, "quantize", str(model_src), "--sequential", "-o", str(tmp_path / "ckpt"), *QUICK)
    finally:
        os.umask(before)
    assert rc == 0, err
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755
    assert {f.stat().st_mode & 0o777 for f in (tmp_path / "ckpt").rglob("*")} == {0o644}

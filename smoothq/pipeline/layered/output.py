"""The checkpoint as it is written: shard files laid out at their final size once the layout is
final, each part's tensors written as soon as they are quantized, and at the end the index,
config.json, generation config and tokenizer, then the rename that marks the output complete."""

from __future__ import annotations

import errno
from pathlib import Path

from ...core.outputs import fsync_dir, fsync_tree
from ...formats.io import CheckpointError, OutputError, quantized_state, replace_dir, write_metadata
from ...formats.stream import ShardWriter, nbytes
from .workdir import discard


def start_writer(run) -> None:
    """Lay the shard files out at their final size (or reopen an interrupted run's), once the
    layout is final (after settle)."""
    try:
        # laid out afresh unless something was written into them (a kill during the layout leaves them unusable)
        create = run.fresh or not run.state["embeddings_done"]
        run.writer = ShardWriter(run.ckpt_dir, run.layout, run.max_shard_bytes, create=create)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            size = sum(nbytes(*v) for v in run.layout.values())
            raise OutputError(
                exc.errno,
                f"not enough disk space for the {size / 1e9:.2f} GB checkpoint next to "
                f"{run.out}; nothing was written. Free some space and retry",
            ) from exc
        raise


def close(run) -> None:
    if run.writer is not None:
        run.writer.close()


def write(run, names: list[str]) -> None:
    """Write `names` from the model's current state (its parts on the meta device are skipped)."""
    wanted = set(names)
    state = {**quantized_state(run.model, run.format, run.float_dtype, run.int8_embeddings), **run.ready}
    got = {k: t for k, t in state.items() if k in wanted and not t.is_meta}
    del state
    missing = sorted(wanted - set(got))
    if missing:
        raise CheckpointError(
            f"the checkpoint in {run.model_dir} has no weights for {missing[:3]}{'...' if len(missing) > 3 else ''}"
        )
    for k in names:
        run.writer.write(k, got.pop(k))


def finish(run, tokenizer) -> Path:
    """Every layer is written: complete the checkpoint and move it into place. Each step can be
    killed: until the rename a resume redoes them (they write the same bytes); after it, the
    output is complete and the working directory a leftover (workdir.finished_run)."""
    from transformers import GenerationConfig

    state, ckpt = run.state, run.ckpt_dir
    if state.get("search"):  # what the search chose, layer by layer, in the checkpoint's record
        run.ckpt_config.smoothq = {**run.ckpt_config.smoothq, "search": state["search"]}
        if run.format == "smoothq":
            run.ckpt_config.quantization_config = {**run.ckpt_config.quantization_config, "search": state["search"]}

    # index, config, tokenizer; then the rename that marks the output complete
    run.writer.finish()
    try:
        generation = GenerationConfig.from_pretrained(run.model_dir)
    except (OSError, ValueError):
        generation = getattr(run.model, "generation_config", None)
    write_metadata(ckpt, run.ckpt_config, generation, tokenizer)
    fsync_tree(ckpt)
    out = run.out
    replace_dir(ckpt, out)
    fsync_dir(out.parent)
    discard(run.work_dir)
    return out

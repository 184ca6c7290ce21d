"""Quantize a model larger than memory: one decoder layer at a time, weights streamed from disk.

    smoothq.quantize_sequential("Llama-3-70B/", "llama70b-w8a8/", calib, scheme="W8A8", alpha=0.8,
                                format="compressed-tensors", device="cuda")

The module skeleton is built on the meta device (`accelerate.init_empty_weights`, or the same
thing without accelerate), so it holds no weights. Then:

1. Plan. A second meta skeleton goes through `resolve` and `W8A8Linear` swaps exactly as
   `quantize()` would; `io.quantized_state` and `io.checkpoint_config` on it give the complete
   output layout (names, dtypes, shapes, shard split) and config.json, identical to what
   `smoothq.formats.io.save` writes for the in-memory pipeline. Weights shared between layers are refused.
2. Embeddings. The non-layer input-side weights are read, and every calibration batch runs
   through the model with each decoder layer replaced by a recorder: the first records the hidden
   states entering layer 0, every one records the arguments its layer is called with (attention
   masks, rotary position embeddings, ALiBi, position ids; these differ per layer in sliding-window
   models), the last stops the forward (on the first batch the forward runs on, so that a layer
   called twice is refused). Outputs a layer passes on to the next besides the hidden states are
   FromLayer markers in the recorded calls, filled with the real values as the layers run.
   A model the table does not list then has the first block of each structure read and
   discovered (`settle`), and the plan redone with what discovery found (linears kept float).
   The shard files are created at their final size (a full disk fails here, before any layer);
   the non-layer tensors are written out and freed.
3. Layers, in order: read layer i's weights onto its device; run every batch through it with
   hooks collecting the per-channel input abs-max of its linears (the same reduction as
   `calibrate`); `smooth()` and `quantize()` it through a one-layer view of the model (so every
   option of those functions applies unchanged); write its tensors; free it.
4. Finish: shard index, config.json, generation config, tokenizer; the directory is renamed into
   place, which is what marks it complete.

The next layer's inputs are, by default, the outputs of the *smoothed and quantized* layer
(`error_propagation=True`): each layer is calibrated on the activations it will see at inference,
errors of the layers before it included. This is not what the in-memory pipeline does (it
calibrates the whole float model in one pass), so it is recorded in the checkpoint's metadata.
With `error_propagation=False` the next inputs are the float layer's outputs, the statistics are
those of the float model, and the checkpoint equals the in-memory pipeline's (bit for bit on CPU).

Peak memory is one layer's float weights plus its quantized copy, plus the calibration hidden
states of one layer (on the compute device, or in CPU memory with `activations="cpu"`), plus the
larger of the input embedding and the LM head while those are written.

Resuming: the run works in `.<output>.partial` next to the output. After each layer its tensors
are fsynced, the hidden states for the next layer are saved there, and `progress.json` records
the layer. An interrupted run (crash, kill, full disk) is picked up with `resume=True`; settings
that do not match the interrupted run's are refused. A kill at any instant is resumable, the
final renames included (workdir.py says how), and one output has one writer at a time
(core/outputs.output_lock).

The package, in the order a run goes through it:

    plan.py         the settings, the output layout and config.json, the sources, the devices
    workdir.py      the working directory and its progress record (what a resume must match)
    outside.py      the embeddings pass (recorder.py records each layer's calls, calls.py replays
                    them) and the tensors outside the decoder layers
    discovery.py    each block known (discovered, or its groups proven) before it is smoothed
    stages.py       one layer's stages, in the in-memory pipeline's order
    activations.py  the hidden states saved between layers, for a resume
    output.py       the shard files and the finished checkpoint
    driver.py       quantize_sequential: all of the above, in turn
and below them: state.py (the run's state), skeleton.py, weights.py, memory.py.
"""

from .calls import FromLayer
from .driver import quantize_sequential, recipe_of
from .skeleton import empty_weights, skeleton
from .workdir import PROGRESS, ResumeError, interrupted_run, partial_dir

__all__ = [
    "FromLayer",
    "PROGRESS",
    "ResumeError",
    "empty_weights",
    "interrupted_run",
    "partial_dir",
    "quantize_sequential",
    "recipe_of",
    "skeleton",
]

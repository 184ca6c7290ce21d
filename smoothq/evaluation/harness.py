"""lm-evaluation-harness bridge: any of its tasks on our model, as it is in memory.

`evaluate_harness(model, tokenizer, ["hellaswag", "arc_easy"])` wraps the module we already hold
(float, emulated or real INT8: whatever `load` / `quantize` returned) in lm-eval's `HFLM` and runs
`lm_eval.simple_evaluate` on it, so the harness scores exactly the model smoothq evaluates; the
result is one row per (task, metric): value, standard error, examples, shots.

lm-eval downloads each task's dataset from the Hugging Face Hub. Offline, a task reads local files
through a task YAML (`dataset_path: json`, `dataset_kwargs: {data_files: {test: FILE}}`) in a
directory passed as `include_path`. Tasks shipped in smoothq/evaluation/harness_tasks/ are stock lm-eval tasks
pointed at smoothq's data directory: `lambada_openai_local` is lm-eval's own `lambada_openai`
(prompt, target, metrics) on `lambada_openai_test.jsonl`.

lm-eval is optional (`pip install 'smoothq[lm-eval]'`); this module imports without it, and every
entry point says how to install it. Importing it with lm-eval present registers the model type
`smoothq` (`--model smoothq --model_args pretrained=OUT`), usable through `python -m smoothq.evaluation.harness`,
which is lm-eval's own command line with that model type added.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..core.data import DataError, data_dir

INSTALL_HINT = "pip install 'smoothq[lm-eval]'"
TASKS_DIR = Path(__file__).parent / "harness_tasks"
OFFLINE_HINT = (
    "lm-eval downloads task datasets from the Hugging Face Hub; offline, give the task local files: "
    "--lm-eval-include DIR with a task YAML in DIR (dataset_path: json, dataset_kwargs: "
    "{data_files: {test: FILE.jsonl}})"
)


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise DataError(f"lm-evaluation-harness is not installed: {INSTALL_HINT}") from None
    return lm_eval


def local_tasks() -> dict[str, Path]:
    """The tasks smoothq ships (smoothq/evaluation/harness_tasks/NAME.yaml), by name."""
    return {p.stem: p for p in sorted(TASKS_DIR.glob("*.yaml"))}


def local_task_config(name: str) -> dict:
    """A shipped task as the config dict lm-eval builds it from: its `include:` resolved in lm-eval's
    own task directory (the stock task's prompt and metrics), and each relative data file in
    smoothq's data directory ($SMOOTHQ_DATA, else ../shared/data)."""
    import yaml

    lm_eval = _lm_eval()
    cfg = yaml.safe_load(local_tasks()[name].read_text())
    include = cfg.pop("include", None)
    if include:
        stock = Path(lm_eval.__file__).parent / "tasks" / include
        if not stock.is_file():
            raise DataError(
                f"task {name!r} builds on lm-eval's {include}, which this lm-eval ({lm_eval.__version__}) does not have"
            )
        cfg = {**yaml.safe_load(stock.read_text()), **cfg}
    cfg.pop("tag", None)  # the stock task's tags (e.g. "lambada") would name it twice
    files = cfg.get("dataset_kwargs", {}).get("data_files", {})
    root = data_dir()
    for split, path in files.items():
        if not Path(path).is_absolute():
            if root is None or not (root / path).is_file():
                raise DataError(
                    f"task {name!r} reads {path} from smoothq's data directory, which "
                    f"{'has no such file' if root else 'is not there'}: set SMOOTHQ_DATA to a "
                    "directory holding it"
                )
            files[split] = str(root / path)
    return cfg


@dataclass
class HarnessTasks:
    """Tasks built (datasets read) and ready to evaluate: load them before the model, so a task
    whose data is missing fails at once."""

    names: list[str]
    manager: object  # lm_eval.tasks.TaskManager
    objects: list = field(default_factory=list)  # top-level lm-eval Task / Group objects


def _manager(names: list[str], include_path: list[str]):
    """lm-eval's TaskManager; indexing its ~15000 stock task configs takes seconds, so only the
    include directories are indexed when they hold every task asked for."""
    from lm_eval.tasks import TaskManager

    for d in include_path:
        if not Path(d).is_dir():
            raise DataError(f"--lm-eval-include {d}: no such directory")
    if include_path:
        tm = TaskManager(include_path=include_path, include_defaults=False)
        if all(n in tm.all_tasks for n in names):
            return tm
    return TaskManager(include_path=include_path or None)


def _top_level(loaded: dict) -> list:
    """The objects a TaskManager.load returned, without the tasks and groups inside a group."""
    groups, tasks = loaded["groups"], loaded["tasks"]
    inner_groups = {g.name for group in groups.values() for g in group.get_all_groups() if g is not group}
    top = [g for n, g in groups.items() if n not in inner_groups]
    grouped = {t.task_name for g in top for t in g.get_all_tasks()}
    return top + [t for n, t in tasks.items() if n not in grouped]


def load_tasks(tasks: list[str], include_path: str | list[str] | None = None) -> HarnessTasks:
    """Build lm-eval tasks by name (stock, shipped in smoothq/evaluation/harness_tasks, or from YAMLs under
    `include_path`); their datasets are read here. A dataset that cannot be read (offline, or a
    missing file) is a DataError naming the task."""
    _lm_eval()
    include = [str(p) for p in ([include_path] if isinstance(include_path, (str, Path)) else include_path or [])]
    shipped = local_tasks()
    stock = [n for n in tasks if n not in shipped]
    tm = _manager(stock, include)
    objects = []
    for name in tasks:
        spec = local_task_config(name) if name in shipped and name not in tm.all_tasks else name
        if isinstance(spec, str) and spec not in tm.all_tasks:
            where = f" nor in {', '.join(include)}" if include else ""
            raise DataError(
                f"lm-eval has no task {name!r} (not among its {len(tm.all_tasks)} tasks, groups and "
                f"tags{where}; smoothq ships {', '.join(shipped) or 'none'}); `lm-eval ls tasks` "
                "lists them, --lm-eval-include DIR adds task YAMLs"
            )
        try:
            objects += _top_level(tm.load([spec]))
        except (OSError, _datasets_error()) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(
                f"lm-eval task {name!r}: its dataset could not be loaded ({reason}): {OFFLINE_HINT}"
            ) from None
    return HarnessTasks(list(tasks), tm, objects)


def _datasets_error() -> type:
    try:
        from datasets.exceptions import DatasetsError
    except ImportError:  # pragma: no cover - lm-eval depends on datasets
        return OSError
    return DatasetsError


@contextmanager
def _as_is(model):
    """While HFLM wraps `model`: no re-tying of its weights (HFLM calls tie_weights(), which would
    replace a separately loaded lm_head by the input embedding: the model is scored as we hold it),
    and no warning that `pretrained` is a module rather than a name (that is the point)."""
    log = logging.getLogger("lm_eval.models.huggingface")
    level = log.level
    log.setLevel(logging.ERROR)
    had = "tie_weights" in vars(model)
    saved = vars(model).get("tie_weights")
    model.tie_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        log.setLevel(level)
        if had:
            model.tie_weights = saved
        else:
            del model.tie_weights


def wrap(model, tokenizer, batch_size: int = 8, max_length: int | None = None):
    """Our in-memory module as an lm-eval LM (HFLM on the very same object: no copy, no reload)."""
    _lm_eval()
    from lm_eval.models.huggingface import HFLM

    if tokenizer is None:
        raise DataError("lm-eval needs the model's tokenizer; save the checkpoint with its tokenizer")
    with _as_is(model):
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def run_harness(
    model,
    tokenizer,
    tasks: list[str] | HarnessTasks,
    limit: int | None = None,
    num_fewshot: int | None = None,
    include_path: str | list[str] | None = None,
    batch_size: int = 8,
    bootstrap_iters: int = 1000,
    log_samples: bool = False,
    seed: int = 0,
) -> dict:
    """lm-eval's `simple_evaluate` on our model: its whole result dict (`results`, `n-samples`,
    `n-shot`, and `samples` with log_samples=True)."""
    from lm_eval import simple_evaluate

    if not isinstance(tasks, HarnessTasks):
        tasks = load_tasks(tasks, include_path)
    lm = wrap(model, tokenizer, batch_size)
    was_training = model.training
    try:
        return simple_evaluate(
            lm,
            tasks=tasks.objects,
            task_manager=tasks.manager,
            limit=limit,
            num_fewshot=num_fewshot,
            bootstrap_iters=bootstrap_iters,
            log_samples=log_samples,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        model.train(was_training)


def rows(results: dict) -> list[dict]:
    """One row per task (and group) and metric: {task, metric, value, stderr, count, fewshot};
    a metric under a filter other than lm-eval's "none" is named "metric (filter)"."""
    out = []
    for task, metrics in results["results"].items():
        count = results.get("n-samples", {}).get(task, {}).get("effective")
        shots = results.get("n-shot", {}).get(task)
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
            out.append(
                {
                    "task": task,
                    "metric": metric if filt == "none" else f"{metric} ({filt})",
                    "value": float(value),
                    "stderr": stderr,
                    "count": count,
                    "fewshot": shots,
                }
            )
    return out


def evaluate_harness(
    model,
    tokenizer,
    tasks: list[str] | HarnessTasks,
    limit: int | None = None,
    num_fewshot: int | None = None,
    include_path: str | list[str] | None = None,
    batch_size: int = 8,
    bootstrap_iters: int = 1000,
) -> list[dict]:
    """lm-eval tasks on our model (as it is: float, emulated or real INT8), as rows
    {task, metric, value, stderr, count, fewshot}. `limit`: the first N examples of each task;
    `num_fewshot`: shots (default: each task's own); `include_path`: directories of task YAMLs;
    `bootstrap_iters`: resamples for the stderr of non-mean metrics (perplexity)."""
    return rows(
        run_harness(
            model,
            tokenizer,
            tasks,
            limit=limit,
            num_fewshot=num_fewshot,
            include_path=include_path,
            batch_size=batch_size,
            bootstrap_iters=bootstrap_iters,
        )
    )


def _register() -> None:
    """The `smoothq` model type: pretrained=OUT (a smoothq checkpoint, either format) or any model
    smoothq.load_model takes (bundled name, .gguf, directory, HF id); quant_backend= for checkpoints."""
    from lm_eval.api.registry import model_registry, register_model
    from lm_eval.models.huggingface import HFLM

    if "smoothq" in model_registry:  # this module run as __main__ and imported too
        return

    @register_model("smoothq")
    class SmoothqLM(HFLM):
        def __init__(
            self,
            pretrained: str,
            quant_backend: str = "auto",
            dtype: str = "float32",
            device: str | None = None,
            batch_size: int | str | None = 8,
            max_length: int | None = None,
            **kwargs,
        ):
            import torch

            from ..core.models import load_model
            from ..formats.io import is_quantized_checkpoint, load

            if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
                device = "cpu"
            if dtype == "auto":
                dtype = "float32"
            if is_quantized_checkpoint(pretrained):
                model, tok = load(pretrained, backend=quant_backend, device=device, dtype=dtype)
            else:
                model, tok = load_model(pretrained, dtype=dtype, device=device)
            with _as_is(model):
                super().__init__(
                    pretrained=model, tokenizer=tok, batch_size=batch_size or 8, max_length=max_length, **kwargs
                )

    globals()["SmoothqLM"] = SmoothqLM


try:
    _register()
except ImportError:  # lm-eval not installed: evaluate_harness and friends say how to install it
    pass


def main() -> None:
    """`python -m smoothq.evaluation.harness ...` = lm-eval's command line, with `--model smoothq` known."""
    lm_eval = _lm_eval()
    from lm_eval.__main__ import cli_evaluate

    del lm_eval
    cli_evaluate()


if __name__ == "__main__":
    main()

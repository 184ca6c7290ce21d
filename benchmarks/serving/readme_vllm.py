"""The README's vLLM-CPU block, run as written (issue 30, item 7): the block that quantizes SmolLM2
with `--preset best-w8a8 --format compressed-tensors`, creates `vllm-env`, installs `vllm-cpu`,
removes the CUDA builds it pulls in, installs smoothq's plugin and starts the OpenAI-compatible
server. Each line runs through bash, unchanged, from a fresh clone of this repository (the README
assumes its checkout as the working directory); the server line runs in the background. Then one
chat request (greedy, at most 32 tokens) asks "What is the capital of France?".

    python benchmarks/serving/readme_vllm.py [--keep] [--workdir DIR] [--ready-timeout 1200]

Heavy: SmolLM2 quantized at the preset's full calibration, a vLLM venv (3.7 GB with the clone),
vLLM's start-up; about 17 minutes on 2 shared cores. Not part of the test suite.

What the lines get from here: `smoothq` and `python` are this checkout's .venv (first on PATH, as
after `make setup` and activating it); the `smoothq` line gets PYTHONPATH set to the clone, so it
runs the clone's code, not this tree's; SMOOTHQ_DATA is this checkout's data (../shared/data unless
set), as the clone has no ../shared/data next to it.

Writes benchmarks/results/readme-vllm.{json,md}: each line's exit code and seconds, the server's
readiness, the answer or the error, as observed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from readme_blocks import readme_blocks  # noqa: E402

from smoothq.evaluation.bench import cpu_name  # noqa: E402
from smoothq.runtime.backends import read_cpu_flags  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
QUESTION = "What is the capital of France?"
PORT = 8000  # vLLM's default: the README's server line names none
LOG_TAIL = 3000  # characters of a failing line's output kept in the results


def vllm_block() -> list[str]:
    """The command lines of the README block that creates vllm-env."""
    for block in readme_blocks():
        commands = [line.command for line in block if line.command]
        if any(c.startswith("python -m venv vllm-env") for c in commands):
            return commands
    raise SystemExit("README.md has no bash block with `python -m venv vllm-env`")


def cpu_flags() -> list[str]:
    """The int8/bf16-relevant instruction sets: what decides vLLM-CPU's kernels."""
    flags = read_cpu_flags() or set()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
    return [f for f in wanted if f in flags]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def run_line(line: str, cwd: Path, env: dict, log: Path) -> dict:
    """One README line through bash, as written; its output goes to `log`."""
    start = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    step = {"line": line, "rc": rc, "seconds": round(time.perf_counter() - start, 1)}
    if rc != 0:
        step["output_tail"] = log.read_text(errors="replace")[-LOG_TAIL:]
    return step


def http_json(url: str, body: dict | None = None, timeout: float = 10) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_until_ready(server: subprocess.Popen, timeout: float) -> tuple[str | None, float]:
    """The served model's id once /v1/models answers, or None if the server exits or times out."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if server.poll() is not None:
            return None, time.perf_counter() - start
        try:
            models = http_json(f"http://127.0.0.1:{PORT}/v1/models", timeout=5)
            return models["data"][0]["id"], time.perf_counter() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, KeyError, IndexError):
            time.sleep(5)
    return None, time.perf_counter() - start


def ask(model_id: str) -> dict:
    body = {
        "model": model_id,
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0,  # greedy
        "max_tokens": 32,
    }
    start = time.perf_counter()
    try:
        reply = http_json(f"http://127.0.0.1:{PORT}/v1/chat/completions", body, timeout=600)
    except urllib.error.HTTPError as exc:
        return {"error": f"HTTP {exc.code}: {exc.read().decode(errors='replace')[:LOG_TAIL]}"}
    except (urllib.error.URLError, OSError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    choice = reply["choices"][0]
    return {
        "answer": choice["message"]["content"],
        "finish_reason": choice.get("finish_reason"),
        "usage": reply.get("usage"),
        "seconds": round(time.perf_counter() - start, 2),
    }


def stop(server: subprocess.Popen) -> int:
    """Ctrl-C to the server's process group (its engine runs in child processes), then harder."""
    for sig, grace in ((signal.SIGINT, 60), (signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        if server.poll() is not None:
            break
        os.killpg(server.pid, sig)
        try:
            server.wait(grace)
        except subprocess.TimeoutExpired:
            continue
    try:  # engine processes its main process left behind, if any (same group: started by us)
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return server.returncode


def installed_version(venv_python: Path, distribution: str) -> str | None:
    if not venv_python.exists():
        return None
    proc = subprocess.run(
        [str(venv_python), "-c", f"import importlib.metadata as m; print(m.version({distribution!r}))"],
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip() or None


def serve_and_ask(line: str, clone: Path, env: dict, logs: Path, ready_timeout: float) -> dict:
    step = {"line": line, "background": True}
    if not port_is_free(PORT):
        step["error"] = f"port {PORT} is already in use: the server would not start; nothing was run"
        return step
    log = logs / "server.log"
    start = time.perf_counter()
    with log.open("w") as out:
        server = subprocess.Popen(
            ["bash", "-c", line], cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        model_id, waited = wait_until_ready(server, ready_timeout)
        step["ready_seconds"] = round(waited, 1)
        if model_id is None:
            exited = server.poll()
            step["error"] = (
                f"the server exited with code {exited} before it was ready"
                if exited is not None
                else f"not ready after {ready_timeout:.0f} s"
            )
        else:
            step["served_model"] = model_id
            step["chat"] = ask(model_id)
    finally:
        step["stopped_by_us"] = server.poll() is None
        step["rc"] = stop(server)
        step["seconds"] = round(time.perf_counter() - start, 1)
        step["server_log_tail"] = log.read_text(errors="replace")[-LOG_TAIL:]
    return step


def markdown(report: dict) -> str:
    lines = [
        "# The README's vLLM-CPU block, run as written",
        "",
        f"`python benchmarks/serving/readme_vllm.py`, {report['date']}; CPU: {report['cpu']} "
        f"({report['threads']} threads; {', '.join(report['cpu_flags']) or 'no int8/bf16 extensions listed'}); "
        f"clone of commit {report['commit'][:12]}; vllm-cpu {report['vllm_cpu_version'] or 'not installed'}.",
        "",
        "| # | line | exit code | seconds |",
        "|---|---|---|---|",
    ]
    for i, step in enumerate(report["steps"], start=1):
        rc = step.get("rc", "not run")
        if step.get("stopped_by_us"):
            rc = f"{rc} (stopped by us)"
        lines.append(f"| {i} | `{step['line']}` | {rc} | {step.get('seconds', '')} |")
    server = report["steps"][-1] if report["steps"] and report["steps"][-1].get("background") else None
    lines.append("")
    if server is None:
        lines.append("The server line was not reached: an earlier line failed (its output is in the JSON).")
    elif "error" in server:
        lines.append(f"Server: {server['error']} (after {server.get('ready_seconds', 0)} s; log tail in the JSON).")
    else:
        chat = server["chat"]
        lines.append(f"Server ready after {server['ready_seconds']} s, serving `{server['served_model']}`.")
        lines.append("")
        if "error" in chat:
            lines.append(f"Chat request ({QUESTION!r}, greedy, max 32 tokens) failed: {chat['error'][:500]}")
        else:
            lines.append(
                f"Chat request ({QUESTION!r}, greedy, max 32 tokens), {chat['seconds']} s, "
                f"finish_reason {chat['finish_reason']}, usage {chat['usage']}:"
            )
            lines += ["", "> " + chat["answer"].replace("\n", "\n> ")]
        lines.append("")
        if server.get("stopped_by_us"):
            lines.append(f"Server stopped by Ctrl-C to its process group: exit code {server['rc']}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="where to clone (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the clone, vllm-env and the logs")
    parser.add_argument("--ready-timeout", type=float, default=1200, help="seconds to wait for the server")
    args = parser.parse_args()

    block = vllm_block()
    work = Path(tempfile.mkdtemp(prefix="readme-vllm-", dir=args.workdir))
    clone, logs = work / "smoothq", work / "logs"
    logs.mkdir()
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    commit = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    # `smoothq` and `python` as after `make setup` with .venv active
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    # the clone is not next to ../shared/data: point at this checkout's data, the README's $SMOOTHQ_DATA
    env["SMOOTHQ_DATA"] = os.environ.get("SMOOTHQ_DATA", str(ROOT.parent / "shared" / "data"))
    # the `smoothq` line runs the clone's code (this tree may hold others' unfinished edits); only that
    # line: in vllm-env the clone must come from `pip install --no-deps .`, as the README says
    smoothq_env = {**env, "PYTHONPATH": str(clone)}
    report = {
        "script": "benchmarks/serving/readme_vllm.py",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "threads": os.cpu_count(),
        "commit": commit.strip(),
        "smoothq_data": env["SMOOTHQ_DATA"],
        "readme_block": block,
        "question": QUESTION,
        "steps": [],
    }
    print(f"working in {work}", flush=True)
    try:
        for number, line in enumerate(block, start=1):
            print(f"[{number}/{len(block)}] {line}", flush=True)
            if "vllm.entrypoints.openai.api_server" in line:
                step = serve_and_ask(line, clone, env, logs, args.ready_timeout)
            else:
                line_env = smoothq_env if line.startswith("smoothq ") else env
                step = run_line(line, clone, line_env, logs / f"line{number}.log")
            report["steps"].append(step)
            print(f"    -> rc {step.get('rc')}, {step.get('seconds')} s {step.get('error', '')}", flush=True)
            if step.get("rc") != 0 and not step.get("background"):
                break  # the lines after it depend on it
    finally:
        report["vllm_cpu_version"] = installed_version(clone / "vllm-env" / "bin" / "python", "vllm-cpu")
        report["torch_in_vllm_env"] = installed_version(clone / "vllm-env" / "bin" / "python", "torch")
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "readme-vllm.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / "readme-vllm.md").write_text(markdown(report))
        print(markdown(report))
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

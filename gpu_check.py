"""The prepared GPU check: every CUDA code path, then the papers' headline figures, in one run.

  python gpu_check.py                   # on a GPU machine: about 6 minutes on an H100
  python gpu_check.py --device cpu      # a dry run of the same code on the CPU (not a measurement)

First tests/test_cuda.py (`pytest -m cuda`: extraction, the official references, bf16, compile,
fused AdamW, a 1-GPU torchrun, resume after a kill; on --device cpu with CUDA_CHECK_DEVICE=cpu,
so that the tests' own code runs), then one row per figure, each section in a child process
under a time budget (a failure or a timeout is reported in its row and the check goes on):

  distill     CanViT-B distillation training throughput (bf16, compiled, batch 64, 512 px
              scenes, 128 px glimpses, 32 x 32 canvas, precomputed teacher features) in
              glimpses/s against the paper's ~1,670/s on one H100 [003]; memory saved for
              backward and peak at rollouts of T = 4 vs 20 (truncated BPTT: flat)
  canvit      CanViT-B inference latency per glimpse at batch 1, eager and compiled
              ([003]: "hundreds of frames per second")
  extraction  one glimpse set from a 256 vs an 8192 px image ([000] Fig. 2: flat)
  foveal      the foveal ViT-S training step (bench.py foveal)
  dino        the SSL step at 4 and 8 sequential glimpses (bench.py dino)
  grpo        the GRPO rollout and one inner epoch (bench.py grpo)

One markdown table with the GPU's name is printed and written to --out (default
out/gpu_check.md), with its JSON and the tests' and sections' logs beside it. On --device cpu
the rows use bench.py's CPU sizes and torch.compile's "eager" backend. The rows are measured by
bench.py's functions, so that the figures match its tables.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import canvit
from bench import (ROOT, DistillBench, _device, _dtype_name, canvit_config, canvit_row,
                   device_name, dino_row, extraction_row, foveal_row, grpo_row, header)

PAPER_GLIMPSES_S = 1e9 / (166 * 3600)          # [003]: 1e9 glimpses in 166 h on one H100
PAPER_DISTILL = f"~{PAPER_GLIMPSES_S:,.0f} glimpses/s on one H100 [003] (1e9 in 166 h)"


class Rows:
    """A gpu section's rows, each appended to a JSON-lines file as soon as it is measured, so
    that what a section measured before its time ran out still reaches the table. A row that
    raises is written with its error and the section goes on."""

    def __init__(self, path: Path):
        self.path = path

    def measure(self, key: str, fn) -> dict | None:
        t0 = time.perf_counter()
        try:
            row, status = fn(), "ok"
        except Exception as e:                               # reported in the row, not fatal
            text = (str(e).strip().splitlines() or [""])[0][:160]
            row, status = {}, f"failed: {type(e).__name__}: {text}"
        row.update(key=key, status=status, seconds=round(time.perf_counter() - t0, 1))
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{key}: {status} ({row['seconds']} s)", flush=True)
        return row if status == "ok" else None


def _num(x: float) -> str:
    """A rate with 3 significant digits below 100 (CPU dry runs), whole numbers above."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _mb(x: float) -> str:
    return f"{x:,.0f} MB"


def gpu_distill(dev: torch.device, rows: Rows) -> None:
    """CanViT-B distillation throughput and memory at T = 4 (the paper's mean rollout: chunks of
    2, p_stop 0.5) and T = 20. CPU: the small CanViT, 256 px scenes, 1 scene."""
    cuda = dev.type == "cuda"
    if cuda:
        setup = functools.cache(lambda: DistillBench(dev, 64, torch.bfloat16, 512, "inductor",
                                                     precomputed=True))
    else:
        cfg, gp, _ = canvit_config(dev)
        setup = functools.cache(lambda: DistillBench(dev, 1, None, 256, "eager", True, cfg, gp))
    got = {}
    for T, repeats in ((4, 3), (20, 2)):
        def row(T=T, repeats=repeats):
            bench = setup()
            r = bench.row(T, repeats if cuda else 1)
            return {**r, "check": f"distill: training throughput, rollouts of T = {T}",
                    "setting": bench.describe(),
                    "result": f"{r['glimpses_s']:,.0f} glimpses/s "
                              f"({r['glimpses_s'] / PAPER_GLIMPSES_S:.2f}x the paper's), "
                              f"{r['s_step']:.2f} s/step",
                    "paper": PAPER_DISTILL}
        got[T] = rows.measure(f"distill_T{T}", row)

    def memory():
        if not (got[4] and got[20]):
            raise RuntimeError("needs both the T = 4 and the T = 20 rows")
        a, b = got[4], got[20]
        return {"check": "distill: memory vs rollout length (T = 4 vs 20)",
                "setting": "the two rows above; " + ("max_memory_allocated over the timed steps"
                                                     if cuda else "peak RSS of the process"),
                "result": f"saved for backward {_mb(a['saved_mb'])} vs {_mb(b['saved_mb'])}; "
                          f"peak {_mb(a['peak_mb'])} vs {_mb(b['peak_mb'])}",
                "paper": "[003] truncated BPTT: activation memory does not grow with T"}
    rows.measure("distill_memory", memory)


def gpu_canvit(dev: torch.device, rows: Rows) -> None:
    """CanViT-B inference latency per glimpse at batch 1, eager and compiled (bf16)."""
    cuda = dev.type == "cuda"
    cfg, gp, G = canvit_config(dev)
    torch.manual_seed(0)
    model = canvit.CanViT(cfg).to(dev).eval()
    dtype, backend = (torch.bfloat16, "inductor") if cuda else (torch.float32, "eager")
    for compiled in (False, True):
        def row(compiled=compiled):
            step = torch.compile(model, dynamic=False, backend=backend) if compiled else model
            r = canvit_row(model, step, dev, gp, G, dtype, 1, 20)
            mode = f"compiled{'' if cuda else ' (eager backend)'}" if compiled else "eager"
            return {**r, "check": f"CanViT inference latency, batch 1, {mode}",
                    "setting": f"D={cfg.backbone.embed_dim} x {cfg.backbone.n_blocks} blocks, "
                               f"{gp} px glimpse, canvas {G}x{G}, {_dtype_name(dtype)}, "
                               f"median of 20 steps",
                    "result": f"{r['ms']:.2f} ms/glimpse ({r['glimpses_s']:,.0f} glimpses/s)",
                    "paper": '[003] "hundreds of frames per second"'}
        rows.measure(f"canvit_{'compiled' if compiled else 'eager'}", row)


def gpu_extraction(dev: torch.device, rows: Rows) -> None:
    """The integral extraction of one glimpse set at a small and a large image: flat [000]."""
    cuda = dev.type == "cuda"
    small, large = (256, 8192) if cuda else (256, 1024)
    repeats = 10 if cuda else 3
    got = {}
    for name, S in (("small", small), ("large", large)):
        def row(S=S):
            r = extraction_row(dev, S, repeats)
            flat = (f"; {r['integral_ms'] / got[small]['integral_ms']:.2f}x the {small} px time"
                    if S == large and got.get(small) else "")
            return {**r, "check": f"extraction: one glimpse set from a {S} px image",
                    "setting": f"8 gazes x (16 multi-zoom + 5x5 grid) patches of 16 px; median "
                               f"of {repeats}",
                    "result": f"integral {r['integral_ms']:.2f} ms (table ready){flat}; "
                              f"{r['integral_table_ms']:.1f} ms with the table; bilinear "
                              f"{r['bilinear_ms']:.2f} ms; crop + interpolate "
                              f"{r['naive_ms']:.1f} ms",
                    "paper": "[000] Fig. 2: flat in the image size (table ready)"}
        got[S] = rows.measure(f"extraction_{name}", row)


def gpu_foveal(dev: torch.device, rows: Rows) -> None:
    cuda = dev.type == "cuda"
    batch, amp = (256, torch.bfloat16) if cuda else (2, None)

    def row():
        r = foveal_row(dev, batch, amp, repeats=3 if cuda else 1)
        return {**r, "check": "foveal ViT-S training step (bench foveal)",
                "setting": f"{batch} images of 224 px x 8 random glimpses, {r['tokens']} tokens "
                           f"a glimpse, {_dtype_name(amp)}, eager",
                "result": f"{r['s_step']:.3f} s/step, {r['glimpses_s']:,.0f} glimpses/s, "
                          f"peak {_mb(r['peak_mb'])}",
                "paper": "-"}
    rows.measure("foveal", row)


def gpu_dino(dev: torch.device, rows: Rows) -> None:
    cuda = dev.type == "cuda"
    batch, amp = (64, torch.bfloat16) if cuda else (2, None)
    for T in (4, 8):
        def row(T=T):
            r = dino_row(dev, batch, amp, T, repeats=2 if cuda else 1, warmup=1 if cuda else 0)
            return {**r, "check": f"SSL (dino) training step, {T} sequential glimpses",
                    "setting": f"dino.DINOConfig() ViT-S, {batch} images of 224 px, "
                               f"{_dtype_name(amp)}, eager",
                    "result": f"{_num(r['images_s'])} images/s, {_num(r['glimpses_s'])} "
                              f"glimpses/s, peak {_mb(r['peak_mb'])}",
                    "paper": "-"}
        rows.measure(f"dino_T{T}", row)


def gpu_grpo(dev: torch.device, rows: Rows) -> None:
    cuda = dev.type == "cuda"
    batch, amp = (64, torch.bfloat16) if cuda else (2, None)

    def row():
        r = grpo_row(dev, batch, amp, repeats=3 if cuda else 1, warmup=1 if cuda else 0)
        return {**r, "check": "GRPO rollout and inner epoch (bench grpo)",
                "setting": f"frozen random ViT-S, {batch} images x G = 16 x T = 8, 8 inner "
                           f"epochs, policy depth 6, {_dtype_name(amp)}",
                "result": f"rollout {_num(r['traces_s'])} traces/s ({_num(r['glimpses_s'])} "
                          f"glimpses/s); one inner epoch {r['inner_epoch_ms']:.0f} ms on "
                          f"{r['states']:,} states; peak {_mb(r['peak_mb'])}",
                "paper": "-"}
    rows.measure("grpo", row)


# name, function, seconds allowed on CUDA, on CPU, its rows (in table order)
GPU_SECTIONS = (
    ("distill", gpu_distill, 95, 400, ("distill_T4", "distill_T20", "distill_memory")),
    ("canvit", gpu_canvit, 30, 120, ("canvit_eager", "canvit_compiled")),
    ("extraction", gpu_extraction, 20, 240, ("extraction_small", "extraction_large")),
    ("foveal", gpu_foveal, 15, 120, ("foveal",)),
    ("dino", gpu_dino, 25, 300, ("dino_T4", "dino_T8")),
    ("grpo", gpu_grpo, 25, 240, ("grpo",)),
)
PYTEST_SECONDS = (140, 300)                     # CUDA, CPU
TOTAL_SECONDS = (345, 1800)                     # the whole check: under ~6 minutes on an H100


def run_section(args) -> None:
    """One section, in a child process (the parent kills it when its time is up)."""
    sections = {name: fn for name, fn, *_ in GPU_SECTIONS}
    if args.section not in sections:
        raise SystemExit(f"--section {args.section!r}: choose one of {', '.join(sections)}")
    dev = _device(args.device)
    header(dev, f"gpu check, section {args.section}")
    sections[args.section](dev, Rows(Path(args.rows)))


def _kill_group(proc: subprocess.Popen) -> None:
    """End the child and what it started (its own process group: start_new_session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _run_child(cmd: list[str], log: Path, timeout: float,
               extra_env: dict | None = None) -> tuple[int | None, float]:
    """Run cmd with its output appended to `log`: (exit status or None on timeout, seconds)."""
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
    return rc, time.perf_counter() - t0


def run_cuda_tests(log: Path, timeout: float, dev: torch.device) -> dict:
    """`pytest -m cuda tests/test_cuda.py` in a child process: counts, failures, seconds."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-m", "cuda",
           "tests/test_cuda.py"]
    if importlib.util.find_spec("xdist"):                # the slow tests are subprocesses
        cmd += ["-n", "4"]
    log.write_text("")
    rc, seconds = _run_child(cmd, log, timeout, {"CUDA_CHECK_DEVICE": dev.type})
    text = log.read_text()
    summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|"
                                                                r"errors?|deselected)", line)]
    counts = {k: 0 for k in ("passed", "failed", "skipped", "errors")}
    for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary[-1] if summary
                              else ""):
        counts["errors" if word.startswith("error") else word] += int(n)
    failures = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    if rc is None:
        status = f"timeout: past {timeout:.0f} s"
    elif rc == 0 or (rc == 5 and not failures):          # 5: nothing collected / all skipped
        status = "ok"
    else:
        status = f"failed (pytest exit {rc})"
    return {"key": "tests", "status": status, "seconds": round(seconds, 1), **counts,
            "failures": failures, "check": "tests/test_cuda.py (pytest -m cuda)",
            "setting": " ".join(cmd[1:]).replace(sys.executable, "python"),
            "result": ", ".join(f"{v} {k}" for k, v in counts.items())
                      + (f": {', '.join(failures[:6])}" if failures else ""),
            "paper": "all pass (all skip without a GPU)"}


def _cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def gpu_report(meta: dict, rows: list[dict]) -> str:
    lines = [f"gpu check: {meta['device']} ({meta['kind']}); torch {meta['torch']}"
             f"{', CUDA ' + meta['cuda'] if meta['cuda'] else ''}; {meta['date']}; "
             f"{meta['cpu_threads']} CPU threads; {meta['seconds'] / 60:.1f} min in all"]
    if meta["kind"] != "cuda":
        lines.append("dry run on the CPU: the benchmarks' CPU sizes, torch.compile with the eager "
                     "backend; a check of the code path, not a measurement")
    lines.append("peak memory: " + ("CUDA max_memory_allocated, reset before each row's timed "
                                    "steps" if meta["kind"] == "cuda" else
                                    "peak RSS of the section's process (never reset)"))
    lines += ["", "| check | setting | result | paper / expected | status |",
              "|---|---|---|---|---|"]
    for r in rows:
        status = r["status"] + (f" ({r['seconds']:.0f} s)" if "seconds" in r else "")
        lines.append("| " + " | ".join(_cell(r.get(k, "-")) for k in
                                       ("check", "setting", "result", "paper")) +
                     f" | {_cell(status)} |")
    return "\n".join(lines) + "\n"


def run_check(args) -> None:
    """tests/test_cuda.py, then each section in a child process under its time budget, every
    one cut to what is left of the whole (keeping 10 s for each section still to come)."""
    t_start, dev = time.monotonic(), _device(args.device)
    cuda = dev.type == "cuda"
    pick = lambda pair: pair[0] if cuda else pair[1]
    deadline = t_start + (args.budget or pick(TOTAL_SECONDS))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device_name(dev), "kind": dev.type, "torch": torch.__version__,
            "cuda": torch.version.cuda or "", "cpu_threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    print(f"gpu check on {meta['device']} ({dev.type}), torch {meta['torch']}; budget "
          f"{deadline - t_start:.0f} s; logs beside {out}", flush=True)
    left = lambda later: deadline - time.monotonic() - 10 * later
    timeout = min(pick(PYTEST_SECONDS), left(len(GPU_SECTIONS)))
    tests = run_cuda_tests(out.with_name(out.stem + "_pytest.log"), timeout, dev)
    print(f"tests: {tests['result']} -> {tests['status']} ({tests['seconds']:.0f} s)", flush=True)
    rows, log = [tests], out.with_name(out.stem + "_sections.log")
    log.write_text("")
    for i, (name, _, cap_cuda, cap_cpu, keys) in enumerate(GPU_SECTIONS):
        timeout = min(cap_cuda if cuda else cap_cpu, left(len(GPU_SECTIONS) - 1 - i))
        got, note = {}, "skipped: no time left in the budget"
        if timeout >= 5:
            with tempfile.TemporaryDirectory() as tmp:
                jsonl = Path(tmp) / "rows.jsonl"
                jsonl.touch()
                cmd = [sys.executable, str(ROOT / "gpu_check.py"), "--device", dev.type,
                       "--section", name, "--rows", str(jsonl)]
                cmd += ["--threads", str(args.threads)] if args.threads else []
                rc, seconds = _run_child(cmd, log, timeout)
                got = {r["key"]: r for r in map(json.loads, jsonl.read_text().splitlines())}
            tail = (log.read_text().strip().splitlines() or [""])[-1][:160]
            note = (f"timeout: the section ran past its {timeout:.0f} s" if rc is None else
                    f"failed: the section exited {rc}: {tail}" if rc else "not measured")
            print(f"section {name}: {'exit ' + str(rc) if rc is not None else 'timeout'} "
                  f"({seconds:.0f} s of {timeout:.0f})", flush=True)
        rows += [got.get(key, {"key": key, "check": key, "status": note}) for key in keys]
    meta["seconds"] = time.monotonic() - t_start
    report = gpu_report(meta, rows)
    out.write_text(report)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("\n" + report + f"\nwritten: {out}, {out.with_suffix('.json')}, "
          f"{out.stem}_pytest.log and {out.stem}_sections.log beside them", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    ap.add_argument("--out", default="out/gpu_check.md", help="markdown; JSON and logs beside it")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole check (default: 345 on CUDA, 1800 on CPU)")
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)   # internal: one child
    ap.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    (run_section if args.section else run_check)(args)


if __name__ == "__main__":
    main()

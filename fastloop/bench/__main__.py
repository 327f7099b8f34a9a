"""``python -m fastloop.bench``: step throughput of fastloop vs a raw PyTorch loop.

With no arguments it times the default workloads (tiny-mlp, the pure loop overhead, and
small-transformer, a model whose step and compile are not trivial) with raw, fastloop-eager,
fastloop-compiled and Lightning (when installed; on CUDA also fastloop-cudagraph and
torch-compile-ro), prints a table and, when matplotlib is installed, writes the bar chart
``fastloop-bench.png`` (``--plot PATH`` elsewhere, ``--no-plot`` none). Progress goes to
stderr, the table to stdout. No new round starts after ``--time-budget`` seconds per workload,
so the default run stays within about 3 minutes on a 2-core CPU once the inductor cache is warm
(``benchmarks/RESULTS.md``, "Compile time"; a cold cache adds about a minute there).

Examples::

    python -m fastloop.bench
    python -m fastloop.bench --workloads tiny-mlp,mnist-mlp --modes eager,compiled --json out.json
    python -m fastloop.bench --contenders raw,fastloop-eager --steps 500 --rounds 7 --plot out.png
    python -m fastloop.bench --list
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from fastloop.bench import report
from fastloop.bench.envinfo import environment
from fastloop.bench.loader_workload import loader_throughput
from fastloop.bench.registry import CONTENDERS, REFERENCE, default_contenders
from fastloop.bench.runner import Row, run_workload
from fastloop.bench.schema import SCHEMA_VERSION
from fastloop.bench.workloads import WORKLOADS, get_workload

# The loop-overhead workload and one model whose compile and step are not trivial.
DEFAULT_WORKLOADS = ("tiny-mlp", "small-transformer")
DEFAULT_PLOT = "fastloop-bench.png"  # written when matplotlib is installed (--no-plot: never)
DEFAULT_STEPS = 100
DEFAULT_ROUNDS = 15
DEFAULT_WARMUP = 10
DEFAULT_TIME_BUDGET = 60.0  # per workload: keeps the default run under 3 minutes on a slow or busy machine


def _csv(text: str) -> List[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastloop.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", type=_csv, default=list(DEFAULT_WORKLOADS),
                   help=f"comma-separated, from: {', '.join(WORKLOADS)} (default {','.join(DEFAULT_WORKLOADS)})")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--modes", type=_csv, default=None,
                       help="fastloop modes to time (eager,compiled,cudagraph); raw is always included")
    group.add_argument("--contenders", type=_csv, default=None,
                       help=f"comma-separated, from: {', '.join(CONTENDERS)}; raw is always included")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="interleaved timed rounds")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed warm-up steps (first one reported)")
    p.add_argument("--time-budget", type=float, default=DEFAULT_TIME_BUDGET, metavar="SECONDS",
                   help="per workload: start no new round after this long, once 3 rounds ran (0: no limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss-rtol", type=float, default=1e-4,
                   help="relative final-loss difference from raw above which a contender is flagged")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", metavar="PATH", help="write results as JSON (schema: fastloop.bench.schema)")
    plot = p.add_mutually_exclusive_group()
    plot.add_argument("--plot", metavar="PATH", default=None,
                      help=f"write a PNG bar chart (needs matplotlib; default {DEFAULT_PLOT} when it is installed)")
    plot.add_argument("--no-plot", action="store_true", help="write no plot")
    p.add_argument("--list", action="store_true", help="list workloads and contenders, then exit")
    return p


def resolve_contenders(args: argparse.Namespace, device: torch.device) -> List[str]:
    if args.contenders is not None:
        names = list(args.contenders)
    elif args.modes is not None:
        names = [f"fastloop-{m}" for m in args.modes]
    else:
        names = default_contenders(device)
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise SystemExit(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
    if REFERENCE not in names:
        names.insert(0, REFERENCE)  # ratios and loss checks are against raw
    return list(dict.fromkeys(names))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but CUDA is not available")
    return torch.device(name)


def run(args: argparse.Namespace,
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> Dict[str, Any]:
    """Run the benchmark described by parsed ``args``; return the JSON document."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    for name in args.workloads:
        get_workload(name)  # fail fast on a typo
    contenders = resolve_contenders(args, device)
    cpus = os.cpu_count() or 1
    if device.type == "cpu" and hasattr(os, "getloadavg") and os.getloadavg()[0] > cpus:
        log(f"note: load average {os.getloadavg()[0]:.1f} on {cpus} CPUs: other processes compete, timings "
            "will be noisy (--threads 1 avoids intra-op threads waiting on descheduled peers)")
    rows: List[Row] = []
    extras: Dict[str, Any] = {}
    for name in args.workloads:
        workload = get_workload(name)
        start = time.perf_counter()
        log(f"[{name}] {workload.description} on {device}")
        if workload.kind == "loader":
            extras[name] = loader_throughput()
            if extras[name]["status"] != "ok":
                rows.append(Row(name, "loader", status="skipped", mode_requested="-", error=extras[name]["reason"]))
            continue
        rows += run_workload(workload, contenders, device, args.steps, args.rounds, args.warmup, args.seed,
                             args.loss_rtol, log, args.time_budget)
        log(f"[{name}] done in {time.perf_counter() - start:.1f}s")
    return {
        "schema_version": SCHEMA_VERSION,
        "env": environment(device),
        "config": {"workloads": list(args.workloads), "contenders": contenders, "steps": args.steps,
                   "rounds": args.rounds, "time_budget_s": float(args.time_budget), "warmup_steps": args.warmup,
                   "seed": args.seed, "loss_rtol": float(args.loss_rtol)},
        "results": [r.as_json() for r in rows],
        "extras": extras,
        "_rows": rows,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for w in WORKLOADS.values():
            print(f"{w.name:20s} {w.description}")
        print("contenders:", ", ".join(CONTENDERS))
        return 0
    doc = run(args)
    rows: List[Row] = doc.pop("_rows")
    env = doc["env"]
    print(f"fastloop.bench  torch {env['torch']}  {env['device']} ({env['device_name']}, "
          f"{env['cpu_count']} CPUs, {env['torch_threads']} threads)  steps/round {args.steps}  rounds {args.rounds}")
    print(report.table(rows))
    print(report.legend())
    for line in report.extras_lines({k: v for k, v in doc["extras"].items() if v.get("status") == "ok"}):
        print(line)
    if args.json:
        tmp = f"{args.json}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2)
        os.replace(tmp, args.json)  # atomic: a reader never sees half a file
        print(f"wrote {args.json}", file=sys.stderr)
    path = plot_path(args)
    if path:
        problem = report.plot(rows, path)
        print(problem or f"wrote {path}", file=sys.stderr)
    return 0


def plot_path(args: argparse.Namespace) -> Optional[str]:
    """Where to write the plot: ``--plot PATH``; by default ``DEFAULT_PLOT`` when matplotlib is
    installed (an explicit ``--plot`` without matplotlib is reported by ``report.plot``)."""
    if args.no_plot:
        return None
    if args.plot is not None:
        return args.plot or None
    return DEFAULT_PLOT if report.matplotlib_available() else None


if __name__ == "__main__":
    sys.exit(main())

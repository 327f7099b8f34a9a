"""Run a ported example under Lightning 1.9.5 and under fastloop, and print what each produced.

A dev tool, not run by CI. For ``examples/lightning_port/<name>.py`` it copies the port folder
twice into a temporary directory, once with the word ``fastloop`` replaced by
``pytorch_lightning``; runs each copy's recipe (below) in its own working directory with a fixed
seed, under the matching interpreter; and prints side by side, after each ``fit``/``test``
call: ``global_step``, ``current_epoch``, the keys of ``callback_metrics``, ``logged_metrics``
and ``progress_bar_metrics``, the ``metrics.csv`` header, row count and step column,
``hparams.yaml``, the checkpoint files written with their top-level and callback keys, and the
epoch EarlyStopping stopped at. Rows that differ are marked ``<>``.

    python scripts/lightning_oracle.py bug_report_model autoencoder generative_adversarial_net
    python scripts/lightning_oracle.py autoencoder --call "mod.cli_main(max_epochs=6, patience=1)"

Lightning's default logger is TensorBoard when tensorboard is installed; the driver makes it a
CSVLogger, fastloop's default, so both write ``metrics.csv``. ``yielding_training_step`` uses
``fastloop.loops.YieldLoop``, which Lightning does not have: it runs under fastloop only.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Dict, List

REPO = pathlib.Path(__file__).resolve().parent.parent
PORT_DIR = REPO / "examples" / "lightning_port"
INTERPRETERS = {"pytorch_lightning": "/tmp/pl19/bin/python", "fastloop": str(REPO / ".venv" / "bin" / "python")}
GAN_ARGS = "Namespace(lr=0.0002, b1=0.5, b2=0.999, latent_dim=16)"
# What each example runs: a Python expression over the imported example module ``mod``.
RECIPES = {
    "bug_report_model": "mod.run(log_every_n_steps=1, enable_progress_bar=False)",
    "autoencoder": "mod.cli_main(max_epochs=4, patience=1, log_every_n_steps=2, enable_progress_bar=False)",
    "generative_adversarial_net": f"mod.main({GAN_ARGS}, max_epochs=2, limit_train_batches=3, log_every_n_steps=2, "
                                  "enable_progress_bar=False)",
    "yielding_training_step": f"mod.main({GAN_ARGS}, max_epochs=2, limit_train_batches=3, log_every_n_steps=2, "
                              "enable_progress_bar=False)",
}
LIGHTNING_ONLY_SKIPS = {"yielding_training_step": "uses fastloop.loops.YieldLoop (Lightning's example defines its own)"}

# Runs inside the temporary directory under one interpreter; prints one JSON line per snapshot.
DRIVER = r'''
import csv, glob, importlib, json, os, sys
from argparse import Namespace
import torch

pkg, name, recipe, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if pkg == "pytorch_lightning":
    # Lightning 1.9 picks TensorBoard when it is installed; fastloop's default is CSV.
    from pytorch_lightning.trainer.connectors.logger_connector import logger_connector as _lc
    _lc._TENSORBOARD_AVAILABLE = _lc._TENSORBOARDX_AVAILABLE = False
lib = importlib.import_module(pkg)


def csv_summary(trainer):
    logger = trainer.logger
    if logger is None:
        return None
    path = os.path.join(logger.log_dir, "metrics.csv")
    if not os.path.isfile(path):
        return {"file": None}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = (rows[0], rows[1:]) if rows else ([], [])
    steps = [r[header.index("step")] for r in body] if "step" in header else []
    summary = {"header": header, "rows": len(body), "steps": steps}
    if os.environ.get("ORACLE_CSV_ROWS"):
        # Rows as "name=value" cells (values rounded: the two runs' numbers are not meant to agree).
        summary["content"] = [" ".join(f"{h}={c[:6]}" for h, c in zip(header, r) if c) for r in body]
    return summary


def hparams_yaml(trainer):
    logger = trainer.logger
    path = os.path.join(logger.log_dir, "hparams.yaml") if logger is not None else ""
    return open(path).read() if os.path.isfile(path) else None


def checkpoints():
    files = sorted(os.path.relpath(p) for p in glob.glob("**/*.ckpt", recursive=True))
    keys = {}
    for path in files:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        keys[path] = sorted(ckpt) + [f"callbacks: {sorted(ckpt.get('callbacks', {}))}"]
    return keys


def snapshot(fn, trainer):
    stop = trainer.early_stopping_callback
    cb = trainer.checkpoint_callback
    return {
        "after": fn,
        "global_step": trainer.global_step,
        "current_epoch": trainer.current_epoch,
        "callback_metrics": sorted(trainer.callback_metrics),
        "logged_metrics": sorted(trainer.logged_metrics),
        "progress_bar_metrics": sorted(trainer.progress_bar_metrics),
        "metrics.csv": csv_summary(trainer),
        "hparams.yaml": hparams_yaml(trainer),
        "checkpoints": checkpoints(),
        "best_model_path": os.path.relpath(cb.best_model_path) if cb is not None and cb.best_model_path else None,
        "early_stopping.stopped_epoch": getattr(stop, "stopped_epoch", None),
    }


def wrap(fn):
    original = getattr(lib.Trainer, fn)

    def entry(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        print("ORACLE " + json.dumps(snapshot(fn, self)), flush=True)
        return result

    setattr(lib.Trainer, fn, entry)


for fn in ("fit", "validate", "test"):
    wrap(fn)
lib.seed_everything(seed)
mod = importlib.import_module("examples.lightning_port." + name)
eval(recipe)
'''


def stage_copy(root: pathlib.Path, package: str) -> pathlib.Path:
    """The port folder, with ``fastloop`` replaced by ``package``, under ``root/examples/lightning_port``."""
    target = root / "examples" / "lightning_port"
    target.mkdir(parents=True)
    for source in PORT_DIR.glob("*.py"):
        (target / source.name).write_text(source.read_text().replace("fastloop", package))
    (root / "oracle_driver.py").write_text(DRIVER)
    return root


def run_one(package: str, name: str, recipe: str, seed: int, mode: str, workdir: pathlib.Path,
            csv_rows: bool = False) -> List[Dict[str, Any]]:
    root = stage_copy(workdir / package, package)
    env = dict(os.environ, PYTHONPATH=str(root), FASTLOOP_MODE=mode, PYTHONWARNINGS="ignore")
    if csv_rows:
        env["ORACLE_CSV_ROWS"] = "1"
    proc = subprocess.run([INTERPRETERS[package], str(root / "oracle_driver.py"), package, name, recipe, str(seed)],
                          cwd=root, env=env, capture_output=True, text=True)
    snapshots = [json.loads(line[len("ORACLE "):]) for line in proc.stdout.splitlines() if line.startswith("ORACLE ")]
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        snapshots.append({"after": "error", "error": tail})
    return snapshots


def show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def print_side_by_side(name: str, lightning: List[Dict[str, Any]], fastloop: List[Dict[str, Any]]) -> int:
    """Print each snapshot key per side; returns how many rows differ."""
    print(f"\n=== {name}")
    differences = 0
    for i in range(max(len(lightning), len(fastloop))):
        left = lightning[i] if i < len(lightning) else {}
        right = fastloop[i] if i < len(fastloop) else {}
        print(f"--- after {left.get('after', '-')} | {right.get('after', '-')}")
        for key in dict.fromkeys([*left, *right]):
            if key == "after":
                continue
            a, b = left.get(key, "(absent)"), right.get(key, "(absent)")
            mark = "  " if a == b else "<>"
            differences += a != b
            if isinstance(a, str) and "\n" in a or isinstance(b, str) and "\n" in b:
                print(f"{mark} {key}:\n     lightning: {show(a)!r}\n     fastloop:  {show(b)!r}")
            else:
                print(f"{mark} {key}:\n     lightning: {show(a)}\n     fastloop:  {show(b)}")
    return differences


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("examples", nargs="+", choices=sorted(RECIPES), help="example file names (without .py)")
    parser.add_argument("--call", help="override the recipe: an expression over the example module `mod`")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--mode", default="eager", help="fastloop's FASTLOOP_MODE for its run (default eager)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories and print where")
    parser.add_argument("--csv-rows", action="store_true", help="also print every metrics.csv row")
    args = parser.parse_args(argv)
    for interpreter in INTERPRETERS.values():
        if not os.path.exists(interpreter):
            parser.error(f"no interpreter at {interpreter}")
    total = 0
    for name in args.examples:
        recipe = args.call or RECIPES[name]
        workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"oracle_{name}_"))
        try:
            if name in LIGHTNING_ONLY_SKIPS:
                lightning = [{"after": "skipped", "reason": LIGHTNING_ONLY_SKIPS[name]}]
            else:
                lightning = run_one("pytorch_lightning", name, recipe, args.seed, args.mode, workdir, args.csv_rows)
            fastloop = run_one("fastloop", name, recipe, args.seed, args.mode, workdir, args.csv_rows)
            total += print_side_by_side(name, lightning, fastloop)
        finally:
            if args.keep:
                print(f"(kept {workdir})")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{total} differing rows")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

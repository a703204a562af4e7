"""``longtrain sweep lr CONFIG --lrs 1e-4..1e-1 --widths 64,128,256``: learning-rate sensitivity of small models.

Owns: expanding the sweep into jobs (one ``longtrain train`` per width x learning rate), running
them as separate processes (``--jobs`` at once, the CPU threads split between them), reading each
run's ``metrics.jsonl``, and writing ``sweep.json`` and ``sweep.png`` (final loss against learning
rate, one line per width and variant) in the sweep directory. ``--variant NAME=OVERRIDES`` (repeated)
runs the whole grid once per variant -- e.g. ``--variant plain= --variant qk="model.qk_norm=true"`` --
so one plot shows whether an option flattens the curve.

The idea (small-scale proxies for large-scale instabilities): how the final loss of small models
depends on the learning rate -- and whether QK-norm, z-loss or Peri-LN flatten that curve at the
high end -- predicts which settings a long, expensive run survives. A width sets ``model.dim``
and scales ``model.ffn_dim`` with it (the heads keep their count); everything else is the config
and the overrides given. Every job's config is loaded and checked before the first one starts,
so a bad override is one error line, not N failed jobs. A run counts as diverged when it failed,
ended with a non-finite loss (mean of its last 3 logged), or ended above the loss it started from
(its first logged). With ``logging.stability_every`` set, each run also reports its largest
attention logit at the last measurement (``trainer/stability.py``): the growth QK-norm prevents.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from longtrain.cli_common import split_config_args
from longtrain.config import ConfigError, load_config
from longtrain.errors import UserError, report_user_error


def parse_lrs(text: str, points: int) -> list[float]:
    """``a..b`` -> ``points`` log-spaced values from a to b inclusive; ``x,y,z`` -> those values."""
    try:
        if ".." in text:
            lo, hi = (float(x) for x in text.split(".."))
            if not 0 < lo < hi or points < 2:
                raise ValueError
            return [lo * (hi / lo) ** (i / (points - 1)) for i in range(points)]
        values = [float(x) for x in text.split(",") if x.strip()]
        if not values or min(values) <= 0:
            raise ValueError
        return values
    except ValueError:
        raise ConfigError(f"--lrs {text!r} must be LO..HI with 0 < LO < HI (and --points >= 2) or a comma list of "
                          f"positive values, e.g. --lrs 1e-4..1e-1 or --lrs 1e-3,1e-2.") from None


def parse_widths(text: str) -> list[int]:
    try:
        widths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        widths = []
    if not widths or min(widths) <= 0:
        raise ConfigError(f"--widths {text!r} must be a comma list of positive integers, e.g. --widths 64,128,256.")
    return widths


def width_overrides(cfg, width: int) -> list[str]:
    """``model.dim`` = width, ``model.ffn_dim`` scaled with it (a multiple of 8)."""
    ffn = max(8, round(cfg.model.ffn_dim * width / cfg.model.dim / 8) * 8)
    return [f"model.dim={width}", f"model.ffn_dim={ffn}"]


def parse_variants(texts: list[str]) -> dict[str, list[str]]:
    """``NAME=OVERRIDES`` (overrides separated by spaces, possibly none) -> {name: overrides}."""
    variants: dict[str, list[str]] = {}
    for text in texts:
        name, sep, rest = text.partition("=")
        name = name.strip()
        if not sep or not name or not name.replace("-", "").replace("_", "").isalnum() or name in variants:
            raise ConfigError(f"--variant {text!r} must be NAME=OVERRIDES with a new name of letters, digits, - or _, "
                              f"e.g. --variant plain= --variant qk=\"model.qk_norm=true optim.z_loss=1e-4\".")
        variants[name] = rest.split()
    return variants


def plan_jobs(config: str | None, overrides: list[str], lrs: list[float], widths: list[int], out: Path,
              variants: dict[str, list[str]] | None = None) -> list[dict]:
    """One job per (variant, width, lr), each config loaded (and so checked) now. Without
    variants there is one, unnamed (``variant`` None), and run directories carry no prefix."""
    jobs = []
    for name, extra in (variants or {None: []}).items():
        try:
            base = load_config(config, [*overrides, *extra])
        except ConfigError as e:
            raise ConfigError(f"sweep variant {name}: {e}" if name else str(e)) from None
        for w in widths:
            for lr in lrs:
                run_dir = out / f"{name + '-' if name else ''}w{w}-lr{lr:.3g}"
                over = [*overrides, *extra, *width_overrides(base, w), f"optim.lr={lr!r}", f"logging.run_dir={run_dir}",
                        "logging.progress=false", "checkpoint.resume=none", "checkpoint.save_final=false"]
                try:
                    load_config(config, over)
                except ConfigError as e:
                    where = f"variant {name}, " if name else ""
                    raise ConfigError(f"sweep {where}width {w}, lr {lr:.3g}: {e}") from None
                jobs.append({"variant": name, "width": w, "lr": lr, "run_dir": run_dir,
                             "argv": ([config] if config else []) + over})
    return jobs


def _launch(job: dict, threads: int) -> subprocess.Popen:
    job["run_dir"].mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    log = open(job["run_dir"] / "job.log", "w")
    job["t0"] = time.perf_counter()
    return subprocess.Popen([sys.executable, "-m", "longtrain.cli", "train", "--no-print-result", *job["argv"]],
                            stdout=log, stderr=subprocess.STDOUT, env=env)


def run_jobs(jobs: list[dict], n_parallel: int) -> list[dict]:
    """Run every job as its own process, ``n_parallel`` at a time; returns their results in order."""
    threads = max(1, (os.cpu_count() or 1) // n_parallel)
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < n_parallel:
            job = pending.pop(0)
            running.append((job, _launch(job, threads)))
        time.sleep(0.05)
        for job, proc in list(running):
            if proc.poll() is not None:
                running.remove((job, proc))
                job.update(rc=proc.returncode, seconds=time.perf_counter() - job.pop("t0"))
                where = f"{job['variant']} " if job["variant"] else ""
                print(f"[longtrain sweep] {where}width {job['width']} lr {job['lr']:.3g}: {_summary(read_result(job))}",
                      flush=True)
    return [read_result(j) for j in jobs]


def read_result(job: dict) -> dict:
    """Final loss (mean of the last 3 logged), first logged loss and whether the run diverged."""
    f = job["run_dir"] / "metrics.jsonl"
    recs = [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []
    losses = [r["loss"] for r in recs if "loss" in r]
    # with logging.stability_every > 0: the largest attention logit of any layer at the last measurement
    logits = [max((v for k, v in r.items() if k.startswith("stability/attn_max_logit/")), default=None) for r in recs]
    logits = [x for x in logits if x is not None]
    final = sum(losses[-3:]) / len(losses[-3:]) if losses else math.nan
    first = losses[0] if losses else math.nan
    diverged = job.get("rc", 0) != 0 or not math.isfinite(final) or final >= first
    return {"variant": job.get("variant"), "width": job["width"], "lr": job["lr"], "final_loss": final if math.isfinite(final) else None,
            "first_loss": first if math.isfinite(first) else None, "diverged": diverged, "rc": job.get("rc"),
            "attn_max_logit": logits[-1] if logits else None,
            "seconds": job.get("seconds"), "run_dir": str(job["run_dir"])}


def _summary(r: dict) -> str:
    loss = "n/a" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
    return f"final loss {loss}" + (" (diverged)" if r["diverged"] else "")


def plot_sweep(results: list[dict], path: Path) -> Path:
    """Final loss against learning rate (log scale), one line per width and variant (a line style
    per variant); diverged runs marked x."""
    from longtrain.trainer.plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(dict.fromkeys(r.get("variant") for r in results))
    styles = ["-", "--", ":", "-."]
    for i, name in enumerate(names):
        for w in sorted({r["width"] for r in results}):
            rows = sorted((r for r in results if r.get("variant") == name and r["width"] == w
                           and r["final_loss"] is not None), key=lambda r: r["lr"])
            label = f"{name + ', ' if name else ''}width {w}"
            line, = ax.plot([r["lr"] for r in rows], [r["final_loss"] for r in rows], marker="o",
                            linestyle=styles[i % len(styles)], label=label)
            bad = [r for r in rows if r["diverged"]]
            ax.scatter([r["lr"] for r in bad], [r["final_loss"] for r in bad], marker="x", s=80,
                       color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final training loss (nats/token)")
    ax.set_title("LR sensitivity (x = diverged)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path, plt)


def sweep_lr(config: str | None, overrides: list[str], lrs: list[float], widths: list[int], out: Path,
             n_parallel: int = 1, variants: dict[str, list[str]] | None = None) -> dict:
    jobs = plan_jobs(config, overrides, lrs, widths, out, variants)
    out.mkdir(parents=True, exist_ok=True)
    results = run_jobs(jobs, n_parallel)
    record = {"config": config, "overrides": overrides, "lrs": lrs, "widths": widths, "variants": variants or {},
              "runs": results}
    (out / "sweep.json").write_text(json.dumps(record, indent=1) + "\n")
    from longtrain.trainer.plots import PlotsUnavailable

    try:
        record["plot"] = str(plot_sweep(results, out / "sweep.png"))
    except PlotsUnavailable as e:
        print(f"[longtrain sweep] {e}", flush=True)
    return record


def _sweep(ns: argparse.Namespace) -> int:
    try:
        config, overrides = split_config_args(ns.args)
        lrs, widths = parse_lrs(ns.lrs, ns.points), parse_widths(ns.widths)
        if ns.jobs < 1:
            raise ConfigError(f"--jobs {ns.jobs} must be >= 1.")
        out = Path(ns.out)
        record = sweep_lr(config, overrides, lrs, widths, out, ns.jobs, parse_variants(ns.variant))
    except UserError as e:  # a bad argument or override: one line, exit code 2, before any job runs
        return report_user_error(e, "longtrain sweep")
    failed = [r for r in record["runs"] if r["rc"] != 0]
    print(f"[longtrain sweep] {len(record['runs'])} runs ({len(failed)} failed, "
          f"{sum(r['diverged'] for r in record['runs'])} diverged): {out / 'sweep.json'}"
          + (f", {record['plot']}" if "plot" in record else ""))
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``sweep lr`` on an argparse subparsers object."""
    p = subparsers.add_parser("sweep", help="small-model sweeps (learning-rate sensitivity)",
                              description="Small-scale proxies run before a long, expensive run.")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    lr = kinds.add_parser("lr", help="final loss against learning rate per width (JSON + PNG)",
                          description="Train one small model per width (model.dim, model.ffn_dim scaled with it) "
                                      "and learning rate, each its own `longtrain train` process; write "
                                      "<out>/sweep.json and <out>/sweep.png (final loss against LR, one line per "
                                      "width; diverged runs marked). Overrides apply to every run, e.g. "
                                      "model.qk_norm=true or optim.z_loss=1e-4; schedule.steps and "
                                      "schedule.warmup_steps set the run length and warmup. A CPU proxy where "
                                      "QK-norm separates the loss (README, Training stability): data.source="
                                      "synthetic data.synthetic_period=8 (repeated random patterns, learnable only "
                                      "through attention) model.vocab_size=32 model.n_heads=1 model.n_kv_heads=1 "
                                      "schedule.steps=300 schedule.warmup_steps=100 --widths 32.")
    lr.add_argument("args", nargs="*", metavar="[CONFIG] [section.key=value ...]")
    lr.add_argument("--lrs", default="1e-4..1e-1", help="LO..HI (log-spaced, --points values) or a comma list")
    lr.add_argument("--points", type=int, default=4, help="learning rates in a LO..HI range")
    lr.add_argument("--widths", default="64,128,256", help="model.dim values, comma separated")
    lr.add_argument("--jobs", type=int, default=1, help="runs at once (each its own process)")
    lr.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES",
                    help="run the grid once more with these overrides (space separated; repeat the option for "
                         "more variants; NAME= for the plain one), e.g. --variant plain= --variant "
                         "qk=\"model.qk_norm=true\": one plot, a line style per variant")
    lr.add_argument("--out", default="runs/sweep-lr", help="sweep directory (sweep.json, sweep.png, one run each)")
    lr.set_defaults(func=_sweep)
    return p

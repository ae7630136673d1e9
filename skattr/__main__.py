"""python -m skattr: the end-to-end report on sklearn's digits (no download).

Sections (``--sections``): ``ntk`` (approximate eNTK kernels and kernel-machine surrogates),
``trak`` (TRAK, LDS, concept attribution), ``attribution`` (TRAK, TracIn, HYDRA, influence
functions and Grad-Cos compared: LDS and surrogate fidelity), ``loss`` (the loss kernel),
``hydra`` (noisy-label detection: HYDRA, TracIn, influence functions, TRAK-1, the
loss-kernel variance and the per-example loss) and ``representation``
(representation tracing).  Writes ``report.html`` (self-contained), ``report.md``,
``results.csv``, ``summary.json`` and the PNG plots to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import platform
import sys
import time

import torch

from .parallel import torch_threads

SECTIONS = {
    "ntk": "skattr.reports.ntk",
    "trak": "skattr.reports.trak",
    "attribution": "skattr.reports.attribution",
    "loss": "skattr.reports.loss_kernel",
    "hydra": "skattr.reports.hydra",
    "representation": "skattr.reports.representation",
}
REPORT_FUNCTION = {
    "ntk": "ntk_report",
    "trak": "trak_report",
    "attribution": "attribution_report",
    "loss": "loss_kernel_report",
    "hydra": "hydra_report",
    "representation": "representation_report",
}

#: What each run size costs on a 2-core CPU, from ``time python -m skattr`` (docs/main_job.md);
#: printed at the start of a run.  The runs use one thread: a shared machine stretches them.
EXPECTED = {
    "tiny": "well under a minute of CPU time",
    "quick": "about 1.5 minutes of CPU time on one thread (longer when the machine is shared)",
    "default": "about 2 minutes of CPU time on one thread (longer when the machine is shared)",
    "full": "45 minutes or more (the ntk section alone took 44 minutes at these sizes)",
}


def _module(name):
    try:
        return importlib.import_module(SECTIONS[name])
    except ImportError:
        return None


def _parser():
    p = argparse.ArgumentParser(prog="python -m skattr", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="skattr_report", help="output folder (default: skattr_report)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="size", const="quick",
                      help="smaller sizes, a smoke run")
    size.add_argument("--full", action="store_const", dest="size", const="full",
                      help="the full study quoted in benchmarks/ and the docs (45 minutes or more)")
    # the test suite's size (a few seconds per section); not part of the documented interface
    size.add_argument("--size", dest="size", choices=["tiny", "quick", "default", "full"],
                      help=argparse.SUPPRESS)
    p.set_defaults(size="default")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated, run in that order (default: {','.join(SECTIONS)})")
    p.add_argument("--seed", type=int, default=0, help="seeds splits, training and projections")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the networks are small, and extra threads "
                        "mostly add synchronisation on a shared machine)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p


def main(argv=None):
    p = _parser()
    args = p.parse_args(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    for name in names:
        if name not in SECTIONS:
            p.error(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    if not names:
        p.error("--sections is empty")
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    from .reports.html import write_report
    from .reports.progress import Progress

    mods = {}
    for name in names:
        mod = _module(name)
        if mod is None:
            print(f"[skattr] section {name!r} is not available in this version; skipped.")
            continue
        mods[name] = mod
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    total = sum(m.n_steps(args.size) for m in mods.values())
    progress = Progress(total, quiet=args.quiet)
    progress.message(f"{args.size} run, sections {', '.join(mods)}: {total} steps, expected "
                     f"{EXPECTED[args.size]}.")
    meta = (f"python {platform.python_version()}, torch {torch.__version__}, {args.threads} "
            f"thread(s), device {'cuda' if torch.cuda.is_available() else 'cpu'}; seed {args.seed}; "
            f"size {args.size}; sections {', '.join(mods)}.")
    sections, summary = [], {"size": args.size, "seed": args.seed, "sections": {}}
    with torch_threads(args.threads):
        for name, mod in mods.items():
            t, cpu = time.perf_counter(), time.process_time()
            fn = getattr(mod, REPORT_FUNCTION[name])
            sec = fn(os.path.join(args.out, name), random_state=args.seed, size=args.size,
                     progress=progress)
            sec.seconds = time.perf_counter() - t
            sections.append(sec)
            if name == "ntk":
                _write_csv(sec.data["rows"], os.path.join(args.out, "results.csv"))
            # CPU seconds beside wall seconds: on a shared machine the wall time says little
            summary["sections"][name] = {"seconds": round(sec.seconds, 1),
                                         "cpu_seconds": round(time.process_time() - cpu, 1),
                                         **{k: v for k, v in sec.data.items() if k != "rows"}}
    elapsed = progress.elapsed()
    summary["seconds"] = round(elapsed, 1)
    summary["cpu_seconds"] = round(time.process_time(), 1)
    md, page = write_report(sections, meta + f" Total run time {elapsed:.0f} s.", args.out)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=_jsonable)
    if not args.quiet:
        print("\nSummary")
        for sec in sections:
            for net, acc in sec.networks:
                print(f"  {sec.title}: {net}, accuracy {acc:.3f}")
        for sec in sections:
            for s in sec.summary:
                print(f"  {sec.title}: {s}")
    progress.message(f"done in {elapsed:.0f} s; report: {page} (and {os.path.basename(md)} beside it)")
    return 0


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def _write_csv(rows, path):
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())

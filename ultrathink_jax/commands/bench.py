"""Runs benchmarks and updates the report: `python -m launch.bench [--only moe,generate] [--quick]`.

Each benchmark writes `benchmarks/<name>.md`; BENCHMARKS.md is rebuilt from all of them, so running one benchmark
does not erase the others' numbers.
"""

import argparse
import importlib
import pathlib
import pkgutil
import sys
import time

import jax

import ultrathink_jax.bench as bench_pkg
from ultrathink_jax import cli
from ultrathink_jax.bench import machine
from ultrathink_jax.config import ConfigError

SECTIONS_DIR = pathlib.Path("benchmarks")
REPORT = pathlib.Path("BENCHMARKS.md")
PROG = "launch.bench"


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench_pkg.__path__) if m.name != "machine")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--only", default="", help=f"comma-separated subset of {available()}")
    parser.add_argument("--quick", action="store_true", help="a smoke run: printed, not written to the report")
    args = parser.parse_args(argv)
    return cli.run_main(PROG, lambda: run_benchmarks(args))


def run_benchmarks(args: argparse.Namespace) -> int:
    names = [n for n in args.only.split(",") if n] or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        raise ConfigError(f"unknown benchmark(s) {unknown}; available: {available()}")
    modules = {name: importlib.import_module(f"ultrathink_jax.bench.{name}") for name in names}
    # A benchmark that needs another backend (the GPU one) is skipped when running all, and its saved section is
    # kept; asked for by name, it is an error.
    backend = jax.default_backend()
    elsewhere = [n for n, m in modules.items() if getattr(m, "REQUIRES_BACKEND", backend) != backend]
    if elsewhere and args.only:
        raise ConfigError(", ".join(f"benchmark {n!r} needs a {modules[n].REQUIRES_BACKEND} backend, this one is "
                                    f"{backend}" for n in elsewhere))
    for name in elsewhere:
        print(f"== skipped {name}: needs a {modules[name].REQUIRES_BACKEND} backend, this one is {backend}",
              file=sys.stderr, flush=True)
    for name, module in modules.items():
        if name in elsewhere:
            continue
        print(f"== {module.TITLE}", file=sys.stderr, flush=True)
        section = (f"## {module.TITLE}\n\nMachine: {machine.describe()}; measured {time.strftime('%Y-%m-%d')} "
                   f"by `python -m launch.bench --only {name}`.\n\n{module.run(quick=args.quick)}\n")
        print(section)
        if not args.quick:
            SECTIONS_DIR.mkdir(exist_ok=True)
            (SECTIONS_DIR / f"{name}.md").write_text(section)
    parts = [p.read_text() for p in sorted(SECTIONS_DIR.glob("*.md"))] if SECTIONS_DIR.exists() else []
    if parts and not args.quick:
        REPORT.write_text("# UltraThink-JAX benchmarks\n\n" + "\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

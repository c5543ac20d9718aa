"""Benchmarks run by `python -m launch.bench`. Each module here defines `TITLE` and `run(quick: bool) -> str`
returning one markdown section (a table plus what was measured, on which machine); none is a timed test."""

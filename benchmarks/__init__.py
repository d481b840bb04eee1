"""Benchmarks for demask, side by side with the reference library (x-transformers 2.31.10).

Run a suite with `python -m benchmarks <suite>` from the repository root (`--help` lists them).
Each suite prints a markdown table and writes a JSON record (machine, torch version, git commit,
config, date). The reference library is a benchmark-only dependency: the demask package never
imports it, and nothing here copies its code; it is only constructed and called through its public
API, with the same arguments as demask.
"""

"""GPU benchmarks: each script prints a table and, with --record, appends a block to BENCHMARKS.md."""

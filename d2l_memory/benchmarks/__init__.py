"""Benchmarks: each module runs one comparison against its baseline in one process and prints a table."""

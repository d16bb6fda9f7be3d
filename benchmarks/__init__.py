"""Benchmarks of X-VLM inference, retrieval evaluation and training (`python -m benchmarks.run`).

See `docs/benchmarks.md` for the results table, the machine and the command.
"""

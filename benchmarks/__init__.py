"""Speed and memory benchmarks (benchmarks/README.md); run from the repository root as
``python -m benchmarks.<name>``."""

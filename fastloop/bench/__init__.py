"""Step-throughput benchmarks: ``python -m fastloop.bench`` compares fastloop's modes with a raw
PyTorch loop (and Lightning when installed) on small synthetic workloads."""

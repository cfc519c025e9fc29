"""winq.benchmarks: the benchmark scripts, installed with winq so that `winq bench --kernels` (which runs
`python -m winq.benchmarks.unpack_gemm`) works from a wheel. Each is also run directly from a checkout
(`python benchmarks/<name>.py`); none is imported by winq itself or run by the test suite."""

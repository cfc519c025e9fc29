"""`winq bench` in one place: how fast each backend runs a model, in its own process.

- run.py: the plan (which backends, which artifacts and float baselines), the worker process
  (`python -m winq.runtime.bench`), one timing per backend and the speedups;
- measure.py: sizes on disk, RSS and peak memory, the machine's description;
- report.py: the JSON written atomically and its bar chart;
- llama.py: llama.cpp's own `llama-bench` found, run and parsed, as a second opinion on the llamacpp
  timings (`benchmarks/llama_bench.py build` builds it).

The timing loop itself is runtime/session.py's `time_session`, shared with every backend's session.
"""

from .report import write_report  # noqa: F401 (the package's API)
from .run import BenchError, BenchSpec, Job, plan, run_bench, run_job, worker, worker_command  # noqa: F401

"""fastclip benchmarks: ``python -m bench.bench_cpu`` and ``python -m bench.bench_update``.

See bench/README.md. Speed is measured here, never in the tests.
"""

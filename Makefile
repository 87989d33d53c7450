# The two commands a newcomer needs; each sets itself up (scripts/bootstrap.sh).
#   make bench   microbenchmarks against torch, then a short trainer run
#   make test    build, tests, and nvcc compile-check of the CUDA kernels
PY := .venv/bin/python

.PHONY: setup test bench clean

setup:
	bash scripts/bootstrap.sh

test: setup
	PYTHON=$(PY) bash .ci/nvcc_check.sh
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m bench.bench_cpu --quick
	$(PY) -m bench.bench_update --quick
	$(PY) examples/dqn.py --summary-json runs/dqn-cartpole.json

clean:
	rm -rf build *.egg-info fastclip/*.so .pytest_cache

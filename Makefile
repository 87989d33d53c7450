# The two commands a newcomer needs; each sets itself up (scripts/bootstrap.sh),
# which builds the extension only when a source, a build flag or torch changed.
#   make bench   microbenchmarks against torch, then a short trainer run
#   make test    build, lint, tests, and nvcc compile-check of the CUDA kernels
#                (FASTCLIP_SKIP_NVCC=1 skips that check locally; CI keeps it)
PY := .venv/bin/python
# Quick benchmark results are not measurements to commit: they go under runs/
# (ignored), not bench/results/.
QUICK := runs/bench

.PHONY: setup test bench clean

setup:
	bash scripts/bootstrap.sh

# What the nvcc compile-check reads: it reruns only when one of these changed. A run
# skipped with FASTCLIP_SKIP_NVCC=1 stamps another state, so the next plain run checks.
NVCC_INPUTS := find csrc .ci/nvcc_check.sh -type f | LC_ALL=C sort | xargs sha256sum; echo skip=$$FASTCLIP_SKIP_NVCC; \
	command -v nvcc && nvcc --version; $(PY) -c "import importlib.metadata as m; print(m.version(\"torch\"))"

test: setup
	bash scripts/lint.sh
	bash scripts/if_changed.sh nvcc-check '$(NVCC_INPUTS)' env PYTHON=$(PY) bash .ci/nvcc_check.sh
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m bench.bench_cpu --quick --json $(QUICK)/cpu-quick.json
	$(PY) -m bench.bench_update --quick --json $(QUICK)/update-quick.json
	$(PY) examples/dqn.py --summary-json runs/dqn-cartpole.json

clean:
	rm -rf build *.egg-info fastclip/*.so .pytest_cache

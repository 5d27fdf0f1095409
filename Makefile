# Two entry points that work on a fresh machine: `make serve` and `make test`.
# Both create the virtual environment in .venv on first use (about 2 minutes, 6.5 GB).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# Extra arguments for server.py, e.g. make serve ARGS="~/checkpoints/sam2 large --port 5000"
ARGS ?=

.PHONY: serve test env clean

serve: $(INSTALLED)
	$(PY) server.py $(ARGS)

# The 20 slowest tests are listed at the end: where to look first when the suite grows slow.
test: $(INSTALLED)
	$(PY) -m pytest -q --durations=20 tests

env: $(INSTALLED)

# torch first (sam2's build imports it), then everything else without build isolation so
# sam2 builds against that torch instead of downloading another copy. SAM2_BUILD_CUDA=0 skips
# sam2's optional CUDA extension, which only --min-mask-region-area uses (sam2's removal of small
# holes and islands; without it the baseline skips that step, so such settings are not compared with it).
$(INSTALLED): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet $$(grep -E '^(torch|torchvision)==' requirements.txt) setuptools wheel
	SAM2_BUILD_CUDA=0 $(VENV)/bin/pip install --quiet --no-build-isolation -r requirements.txt
	touch $(INSTALLED)

clean:
	rm -rf $(VENV)

# The GPU proof (README, "Benchmark on a GPU"). gpu-wheels needs network and the venv;
# gpu-benchmark runs on a CUDA machine's own Python, offline, from the wheel folder.
WHEELS ?= wheels
OUT ?= gpu-results
.PHONY: gpu-wheels gpu-benchmark
gpu-wheels: $(INSTALLED)
	tools/gpu_wheels.sh "$(WHEELS)"

gpu-benchmark:
	tools/gpu_benchmark.sh --wheels "$(WHEELS)" --out "$(OUT)"

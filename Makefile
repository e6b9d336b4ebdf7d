# Everything installs itself into .venv on first use: torch first (from TORCH_INDEX where set), then the project.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A pip index to take torch from, e.g. PyTorch's CPU wheel index: on Linux, pip's default torch is the CUDA build.
TORCH_INDEX ?=

.PHONY: demo test test-fast fuzz bench gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[app,dev]"
	# Triton, where torch's build did not bring one: the tests run the decode kernels in its interpreter
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "triton==3.6.0"
	touch $@

demo: $(VENV)/.installed  ## DRACO on digits: 6 CPU ranks, rank 4 lies every step
	PYTHONWARNINGS=ignore $(PY) examples/train.py compare_clean=true $(ARGS)

test: $(VENV)/.installed  ## the whole suite: unit, property, six-rank gloo training, the app under torchrun and SLURM
	$(PY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder $(ARGS)

test-fast: $(VENV)/.installed  ## single-process tests only
	$(PY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder -m "not distributed and not launch" $(ARGS)

# What make fuzz searches: the decoders' properties by default; e.g. FUZZ_TESTS=tests/test_aggregators.py
FUZZ_TESTS ?= tests/test_frc.py tests/test_crc.py -k decode

fuzz: $(VENV)/.installed  ## long property-based search with fresh random cases (the suite's are fixed per test)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q $(FUZZ_TESTS) $(ARGS)

bench: $(VENV)/.installed  ## decode speed: plain mean vs each decoder
	$(PY) benchmarks/decode.py $(ARGS)

gpu-check: $(VENV)/.installed  ## on one GPU: CUDA decode tests, numerics of both codes and reactive mode (TF32, bf16-mixed, liar), CUDA decode table
	PYTHON=$(PY) bash scripts/gpu_check.sh $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun lightning_logs .pytest_cache .hypothesis

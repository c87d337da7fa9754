# Tasks. `make lint` is what .ci/run checks beside the tests.
PYTHON ?= python
SRC := dpkernels tests bench examples
BENCH_ARGS ?=
DEMO_ARGS ?=

.PHONY: test lint bench demo

test:
	$(PYTHON) -m pytest -q

lint:
	ruff check $(SRC)
	ruff format --check $(SRC)
	mypy dpkernels

# e.g. make bench BENCH_ARGS="--models gpt2-small --batch-sizes 32 --device cuda"
bench:
	$(PYTHON) -m bench $(BENCH_ARGS)

# e.g. make demo DEMO_ARGS="--strategy two-pass --clipping automatic"
demo:
	$(PYTHON) -m dpkernels.demo $(DEMO_ARGS)

# `make demo`: set up and run the main job (the quick grid on the embedded MLflow store).
# `make test`: set up and run the checks (ruff and pytest).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint data clean faults

# `make faults`: the fault campaign (kill `ablate run` at random moments, check nothing is lost).
N ?= 100
# `make test` runs the test files on this many pytest processes (each file whole on one, in the
# order tests/conftest.py gives them: the longest first).
TEST_WORKERS ?= 2

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev,postgres]'
	touch $(STAMP)

data:
	@sh scripts/ensure-fashion-mnist.sh

demo: $(STAMP) data
	$(BIN)/ablate run experiments/quick.yaml

lint: $(STAMP)
	$(BIN)/ruff check resnet_ablate tests
	$(BIN)/ruff format --check resnet_ablate tests

test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

faults: $(STAMP)
	$(BIN)/python scripts/fault_campaign.py --kills $(N)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

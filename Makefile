# Two entry points do all the set-up: `make train` (the default-profile flow) and `make test`.
# Both create .venv from uv.lock first (idempotent), using only PyPI.
PYTHON ?= python3.11
UV_VERSION ?= 0.13.9
VENV := .venv
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: setup train test stack-test lint ui docs docs-config docs-screenshots clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml uv.lock
	$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet "uv==$(UV_VERSION)"
	$(PYTHON) -m uv sync --frozen --extra dev --python $(PYTHON)
	touch $@

train: setup  ## the main job: the whole flow, default profile (needs CXR_DATA_DIR or ARGS=--data-dir DIR)
	$(VENV)/bin/cxr train --profile default $(ARGS)

test: setup  ## unit tests on synthetic images + integration tests on a small real subset
	$(VENV)/bin/pytest $(ARGS)

stack-test: setup  ## the team stack (docker/compose.yaml) in real containers; skips where Docker cannot run
	bash docker/stack_test.sh $(ARGS)

lint: setup
	$(VENV)/bin/ruff check cxr_model cxr_pneumonia tasks flows tests benchmarks

ui: setup  ## browse runs and the registry at http://127.0.0.1:5000 (a tracking server: open its own URL)
	@uri="$${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}"; \
	case "$$uri" in \
	  http://*|https://*) echo "MLFLOW_TRACKING_URI is a tracking server: open $$uri in a browser (it serves the UI)"; \
	     $(VENV)/bin/python -m cxr_pneumonia.ui_link;; \
	  *) MLFLOW_TRACKING_URI="$$uri" $(VENV)/bin/python -m cxr_pneumonia.ui_link; \
	     exec $(VENV)/bin/mlflow ui --backend-store-uri "$$uri" --host 127.0.0.1 --port 5000;; \
	esac

docs: docs-config  ## rebuild docs/benchmarks.md's tables from benchmarks/results/*.json, and the configuration page
	$(VENV)/bin/python -m benchmarks.report --plots

docs-config: setup  ## regenerate docs/configuration.md from the config (a unit test fails when it is stale)
	$(VENV)/bin/python -m cxr_pneumonia.config_docs docs/configuration.md

docs-screenshots: setup  ## docs/images/mlflow-*.png: `mlflow ui` on a smoke run, shot by headless chromium
	CXR_SCREENSHOTS=docs/images $(VENV)/bin/pytest tests/test_ui_browser.py $(ARGS)

clean:
	rm -rf work

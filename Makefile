# The two commands of the README: `make run` (generate with the embedded default) and `make test`.
PROMPT ?= a red circle on a blue background
VENV := .venv/bin

.PHONY: bootstrap run test lint typecheck unit bench shapes-model

bootstrap:
	bash scripts/bootstrap.sh

run: bootstrap
	$(VENV)/diffstudio run "$(PROMPT)"

lint: bootstrap
	$(VENV)/ruff check .

typecheck: bootstrap
	$(VENV)/mypy

unit: bootstrap
	$(VENV)/python -m pytest

test: lint typecheck unit

# Rebuild the embedded diffstudio/shapes model from nothing (about 60-90 minutes on 2 CPU cores), install its
# weights into plugins/shapes and print the evaluation. Interrupted runs continue where they stopped.
shapes-model: bootstrap
	bash scripts/shapes-model.sh build/shapes

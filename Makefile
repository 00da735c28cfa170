# The two commands of the README: `make run` (generate with the embedded default) and `make test`.
PROMPT ?= a red circle on a blue background
VENV := .venv/bin

.PHONY: bootstrap run test lint typecheck unit bench

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

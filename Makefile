# The two commands of the README: `make run` (generate with the embedded default) and `make test`.
PROMPT ?= a red circle on a blue background
VENV := .venv/bin

.PHONY: bootstrap run test lint typecheck unit bench shapes-model fuzz

bootstrap:
	bash scripts/bootstrap.sh

run: bootstrap
	$(VENV)/diffstudio run "$(PROMPT)"

lint: bootstrap
	$(VENV)/ruff check .
	$(VENV)/lint-imports

typecheck: bootstrap
	$(VENV)/mypy

unit: bootstrap
	$(VENV)/python -m pytest

test: lint typecheck unit

# Rebuild the embedded diffstudio/shapes model from nothing (about 60-90 minutes on 2 CPU cores), install its
# weights into plugins/shapes and print the evaluation. Interrupted runs continue where they stopped.
shapes-model: bootstrap
	bash scripts/shapes-model.sh build/shapes

# The long fuzzing run (issue: security): >= 100,000 header cases plus LoRA files, job files, template folders and
# call arguments. Prints one JSON line per suite (cases, ok, typed, untyped, silent, wrong, hang) and the total; a
# crash shows as a failed pytest exit status. The short run (a few hundred cases per suite) is part of `make test`.
fuzz: bootstrap
	rm -rf build/fuzz
	DIFFSTUDIO_FUZZ=long $(VENV)/python -m pytest tests/fuzz -q; status=$$?; \
	$(VENV)/python tests/fuzz/report.py && exit $$status

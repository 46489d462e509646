# Task entry points. Every target runs inside the project's venv (created by `make setup`).
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test protos protos-check lint typecheck fmt bench

setup:            ## venv + locked dependencies + buf
	bash scripts/setup.sh

demo: setup       ## the flash-sale story end to end on embedded defaults
	.venv/bin/flashcrowd demo

test: setup       ## the whole suite (what CI runs)
	bash scripts/test.sh

protos:           ## regenerate Python stubs from protos/
	bash scripts/gen_protos.sh

protos-check:     ## buf lint + fail if generated stubs drift from protos/
	cd protos && ../node_modules/.bin/buf lint
	bash scripts/gen_protos.sh >/dev/null
	git diff --exit-code --stat -- gen/ || (echo "generated stubs differ from protos/: run 'make protos' and commit" && exit 1)
	test -z "$$(git status --porcelain -- gen/)" || (echo "untracked generated files: run 'make protos' and commit" && exit 1)

lint:             ## ruff
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

typecheck:        ## mypy over services/ and bench/ ([tool.mypy] in pyproject.toml)
	.venv/bin/mypy

fmt:
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

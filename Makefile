.PHONY: test demo bootstrap clean
test:
	scripts/test
demo:
	scripts/demo
bootstrap:
	scripts/bootstrap
clean:
	rm -rf .venv .mypy_cache .pytest_cache .ruff_cache build *.egg-info

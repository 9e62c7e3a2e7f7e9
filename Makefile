# Two commands from a fresh clone: `make dev` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: dev test bench lint install install-test compose kubectl system-packages clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The broker server is the project with its `server` extra (the bare project is the light client
# and resource-server kit); a change to pyproject.toml re-installs.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[server]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[server,test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: system-packages kubectl $(VENV)/.installed-test compose

## make system-packages: the programs the suite runs that pip cannot install, from the machine's
## apt where missing: xmlsec1 (the pysaml2 test IdP signs with it), redis-server (the suite
## starts its own on free ports), PostgreSQL's initdb/postgres (OpenBao's database engine tests
## start their own cluster), chromium (the approvals page tests drive Debian's chromium through
## Playwright: its own browser downloads are not used), and curl/xz for scripts/debian-binary
## (`make kubectl` and `make compose` fetch from Debian's mirror what the machine lacks).
## As root: apt-get install (apt-get update first only if the install fails without it);
## otherwise one line naming the packages and the command, and make stops.
SYSTEM_PROGRAMS  ?= xmlsec1=xmlsec1 redis-server=redis-server initdb=postgresql chromium=chromium \
                    curl=curl xz=xz-utils
POSTGRES_BINDIRS ?= /usr/lib/postgresql/*/bin
SYSTEM_PACKAGES_UID ?= $(shell id -u)
APT_GET ?= apt-get
APT_INSTALL = apt-get install -y --no-install-recommends

# The packages whose program is missing (evaluated only when system-packages runs).
SYSTEM_MISSING = $(strip $(shell \
	programs="$(SYSTEM_PROGRAMS)"; \
	has() { command -v "$$1" >/dev/null 2>&1 && return 0; \
	  for dir in $(POSTGRES_BINDIRS); do [ -x "$$dir/$$1" ] && return 0; done; return 1; }; \
	for pair in $$programs; do \
	  IFS==; set -- $$pair; IFS=" "; has "$$1" || echo "$$2"; done))

system-packages:
	$(eval missing := $$(SYSTEM_MISSING))
	$(if $(and $(missing),$(filter-out 0,$(SYSTEM_PACKAGES_UID))),$(error \
	  make system-packages: missing $(missing); run: sudo $(APT_INSTALL) $(missing)))
	@$(if $(missing),set -e; echo "make system-packages: $(APT_INSTALL) $(missing)"; \
	export DEBIAN_FRONTEND=noninteractive; \
	$(APT_GET) install -y --no-install-recommends $(missing) \
	  || { $(APT_GET) update && $(APT_GET) install -y --no-install-recommends $(missing); } \
	  || { echo "make system-packages: could not install $(missing)" >&2; exit 1; },:)

## make kubectl: the tests render deploy/kubernetes with `kubectl kustomize` (kubectl >= 1.27:
## Debian bookworm's kubernetes-client is 1.20, too old for the manifests' kustomization syntax).
## Where the machine has none that new, Debian trixie's kubectl (a static Go binary; its only
## dependency is libc6) is unpacked into $(BIN)/kubectl; the Kubernetes release downloads are
## not reachable from every machine, Debian's mirror is.
KUBECTL_MIN_MINOR ?= 27
DEBIAN_MIRROR     ?= http://deb.debian.org/debian
DEBIAN_SUITE      ?= trixie
export DEBIAN_MIRROR DEBIAN_SUITE
kubectl:
	@if $(BIN)/kubectl version --client >/dev/null 2>&1; then :; \
	elif minor="$$(kubectl version --client -o json 2>/dev/null \
	        | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p' | head -n 1)" \
	    && [ -n "$$minor" ] && [ "$$minor" -ge $(KUBECTL_MIN_MINOR) ]; then :; \
	else scripts/debian-binary kubectl usr/bin/kubectl $(BIN)/kubectl && $(BIN)/kubectl version --client; fi

## make compose: a docker compose v2 binary for the tests of docker-compose.yml, where the
## machine has neither `docker compose` nor `docker-compose`: Debian trixie's docker-compose
## package (a static Go binary; its only dependency is libc6), unpacked into $(BIN)/docker-compose.
compose:
	@if docker compose version >/dev/null 2>&1 || docker-compose version >/dev/null 2>&1 \
	    || $(BIN)/docker-compose version >/dev/null 2>&1; then :; \
	else scripts/debian-binary docker-compose usr/libexec/docker/cli-plugins/docker-compose \
	    $(BIN)/docker-compose && $(BIN)/docker-compose version; fi

## make dev: run the broker with embedded development defaults and print a walkthrough
dev: install
	$(BIN)/broker dev

## make test: install what the suite needs (system packages included), lint, run the whole suite
test: install-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

## make bench: benchmarks with same-run baselines (the test and bench extras), run by an
## interpreter built as production's is. The image's python:3.11-slim, like Debian's python3, is
## built with profile-guided and link-time optimisation; pyenv's default build is not, and runs
## the broker 7-18 % slower. BENCH_PYTHON (default: the machine's /usr/bin/python3 where
## it is 3.11 or newer, else $(PYTHON)) gets its own venv, .venv-bench; the bench header names it.
BENCH_PYTHON ?= $(or $(shell /usr/bin/python3 -c 'import sys, ensurepip; print(sys.executable if sys.version_info >= (3, 11) else "")' 2>/dev/null),$(PYTHON))
BENCH_VENV   := .venv-bench

$(BENCH_VENV)/bin/python:
	$(BENCH_PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip

$(BENCH_VENV)/.installed-bench: pyproject.toml | $(BENCH_VENV)/bin/python
	$(BENCH_VENV)/bin/python -m pip install --quiet -e '.[server,test,bench]'
	touch $@

bench: $(BENCH_VENV)/.installed-bench
	$(BENCH_VENV)/bin/python -m bench

lint: install-test
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(BENCH_VENV) var .pytest_cache .ruff_cache .hypothesis

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
## Playwright: its own browser downloads are not used), and curl/xz for `make compose` when it
## has to fetch compose.
## As root: apt-get install (apt-get update first only if the install fails without it);
## otherwise one line naming the packages and the command, and make stops.
SYSTEM_PROGRAMS  ?= xmlsec1=xmlsec1 redis-server=redis-server initdb=postgresql chromium=chromium
COMPOSE_PROGRAMS ?= curl=curl xz=xz-utils
POSTGRES_BINDIRS ?= /usr/lib/postgresql/*/bin
SYSTEM_PACKAGES_UID ?= $(shell id -u)
APT_GET ?= apt-get
APT_INSTALL = apt-get install -y --no-install-recommends

# The packages whose program is missing (evaluated only when system-packages runs).
SYSTEM_MISSING = $(strip $(shell \
	programs="$(SYSTEM_PROGRAMS)"; \
	if ! { docker compose version >/dev/null 2>&1 || docker-compose version >/dev/null 2>&1 \
	    || $(BIN)/docker-compose version >/dev/null 2>&1; }; then \
	  programs="$$programs $(COMPOSE_PROGRAMS)"; fi; \
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

## make kubectl: the tests render deploy/kubernetes with `kubectl kustomize` (kubectl >= 1.27;
## Debian's own kubernetes-client is 1.20, too old for the manifests' kustomization syntax, and
## the Kubernetes release downloads are not reachable from every machine): one line if missing.
kubectl:
	@command -v kubectl >/dev/null 2>&1 || { echo "make test: install kubectl >= 1.27 (kubectl kustomize renders deploy/kubernetes): https://kubernetes.io/docs/tasks/tools/" >&2; exit 1; }

## make compose: a docker compose v2 binary for the tests of docker-compose.yml, where the
## machine has neither `docker compose` nor `docker-compose`: Debian's docker-compose package
## (a static Go binary; its only dependency is libc6), unpacked into $(BIN)/docker-compose.
DEBIAN_MIRROR ?= http://deb.debian.org/debian
DEBIAN_SUITE  ?= trixie

compose:
	@if docker compose version >/dev/null 2>&1 || docker-compose version >/dev/null 2>&1 \
	    || $(BIN)/docker-compose version >/dev/null 2>&1; then :; \
	else $(MAKE) --no-print-directory $(BIN)/docker-compose; fi

$(BIN)/docker-compose:
	@set -eu; \
	case "$$(uname -m)" in \
	  x86_64|amd64) arch=amd64 ;; \
	  aarch64|arm64) arch=arm64 ;; \
	  *) echo "make compose: no Debian docker-compose build for $$(uname -m)" >&2; exit 1 ;; \
	esac; \
	tmp="$$(mktemp -d)"; trap 'rm -rf "$$tmp"' EXIT; \
	index="$(DEBIAN_MIRROR)/dists/$(DEBIAN_SUITE)/main/binary-$$arch/Packages.xz"; \
	curl -fsSL "$$index" | xz -d > "$$tmp/Packages"; \
	field() { awk -v f="$$1:" '/^Package: /{p=($$2=="docker-compose")} p&&$$1==f{print $$2; exit}' "$$tmp/Packages"; }; \
	file="$$(field Filename)"; sha="$$(field SHA256)"; \
	test -n "$$file" && test -n "$$sha" || { echo "make compose: docker-compose not in $$index" >&2; exit 1; }; \
	echo "make compose: $(DEBIAN_MIRROR)/$$file"; \
	curl -fsSL -o "$$tmp/compose.deb" "$(DEBIAN_MIRROR)/$$file"; \
	echo "$$sha  $$tmp/compose.deb" | sha256sum -c --quiet -; \
	dpkg-deb -x "$$tmp/compose.deb" "$$tmp/root"; \
	mkdir -p "$(@D)"; \
	install -m 0755 "$$tmp/root/usr/libexec/docker/cli-plugins/docker-compose" "$@"; \
	"$@" version

## make dev: run the broker with embedded development defaults and print a walkthrough
dev: install
	$(BIN)/broker dev

## make test: install what the suite needs (system packages included), lint, run the whole suite
test: install-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

## make bench: benchmarks with same-run baselines (the test and bench extras)
$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[server,test,bench]'
	touch $@ $(VENV)/.installed-test $(VENV)/.installed

bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench

lint: install-test
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .hypothesis

# qedfuse build/test scaffolding.  Run `make` for the list of targets.
#
# Every target is idempotent: `deps` does no apt work when the packages are
# already installed, and `venv` is rebuilt only when pyproject.toml changes.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON     ?= python3
VENV       := .venv
VENV_BIN   := $(VENV)/bin
VENV_STAMP := $(VENV)/.qedfuse-installed
QEDFUSE    := $(VENV_BIN)/qedfuse

# Debian packages needed to build pyfuse3 and to run the full test suite.
DEB_PKGS := fuse3 libfuse3-dev pkg-config qemu-utils qemu-system-common fio e2fsprogs \
            python3-dev systemd psmisc util-linux gcc

# Lint only the directories that exist (bench/ and tests/ may not yet).
LINT_DIRS := $(wildcard qedfuse tests bench)

# `make run IMAGE=path.qed`; without IMAGE, demo.qed (created on first use).
IMAGE ?=
DEMO_IMAGE := demo.qed
DEMO_SIZE  := 1G
MNT        := mnt

# Extra arguments passed through to pytest / the benchmark.
PYTEST_ARGS ?=
BENCH_ARGS  ?=

# In CI a missing tool or /dev/fuse must fail the run, not skip (tests/support.py).
ifeq ($(CI),true)
export QEDFUSE_REQUIRE_TOOLS := 1
endif

SYSTEMD_UNITS := $(wildcard systemd/*.service systemd/*.mount)

# `make install`: a self-contained copy (its own venv, a non-editable install) under PREFIX.
# DESTDIR stages the files for a package; the venv's paths are rewritten to the final ones.
PREFIX      ?= /usr/local
BINDIR      ?= $(PREFIX)/bin
LIBDIR      ?= $(PREFIX)/lib/qedfuse
MANDIR      ?= $(PREFIX)/share/man
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
SYSTEMDDIR  ?= /etc/systemd/system
DESTDIR     ?=

.PHONY: help deps venv lint test run install uninstall bench clean

help:
	@echo "qedfuse make targets:"
	@echo "  make deps     install the Debian packages (as root; no-op when all are present)"
	@echo "  make venv     create .venv and pip install -e '.[test]' (builds pyfuse3 from source)"
	@echo "  make lint     ruff check, ruff format --check, mypy --strict"
	@echo "  make test     deps + venv + lint + pytest   (PYTEST_ARGS='-k engine' passes through)"
	@echo "  make run      mount IMAGE (default: $(DEMO_IMAGE), created if missing) at ./$(MNT)"
	@echo "  make install  install a self-contained copy: $(LIBDIR) (own venv), $(BINDIR)/qedfuse,"
	@echo "                qedfuse(1), bash completion, systemd units (PREFIX=, DESTDIR= honoured)"
	@echo "  make uninstall  remove what make install installed"
	@echo "  make bench    run the benchmarks: .venv/bin/python -m bench (BENCH_ARGS passes through)"
	@echo "  make clean    remove .venv, build artefacts and caches (keeps $(DEMO_IMAGE))"

# --------------------------------------------------------------------------- deps
deps:
	@missing=(); \
	for p in $(DEB_PKGS); do \
	  st=$$(dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null || true); \
	  [ "$$st" = 'install ok installed' ] || missing+=("$$p"); \
	done; \
	if [ $${#missing[@]} -eq 0 ]; then \
	  echo "deps: all Debian packages present"; exit 0; \
	fi; \
	echo "deps: missing Debian packages: $${missing[*]}"; \
	if [ "$$(id -u)" -ne 0 ]; then \
	  echo "deps: not root; run:" >&2; \
	  echo "  sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y $${missing[*]}" >&2; \
	  exit 1; \
	fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get -o DPkg::Lock::Timeout=600 update; \
	apt-get -o DPkg::Lock::Timeout=600 install -y "$${missing[@]}"

# --------------------------------------------------------------------------- venv
venv: $(VENV_STAMP)

# deps is order-only: it is checked every time but never forces a reinstall.
$(VENV_STAMP): pyproject.toml | deps
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	  || { echo "venv: $(PYTHON) is older than 3.11; set PYTHON=python3.11" >&2; exit 1; }
	[ -x $(VENV_BIN)/python ] && $(VENV_BIN)/python -c '' 2>/dev/null \
	  || { rm -rf $(VENV); $(PYTHON) -m venv $(VENV); }
	$(VENV_BIN)/python -m pip install --quiet --upgrade pip
	$(VENV_BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

# --------------------------------------------------------------------------- lint
lint: venv
	$(VENV_BIN)/ruff check $(LINT_DIRS)
	$(VENV_BIN)/ruff format --check $(LINT_DIRS)
	$(VENV_BIN)/mypy

# --------------------------------------------------------------------------- test
test: deps venv lint
	@rc=0; $(VENV_BIN)/python tests/run_suite.py $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "test: pytest collected no tests; treating that as a failure" >&2; fi; \
	exit $$rc

# --------------------------------------------------------------------------- run
run: deps venv
	@image='$(IMAGE)'; \
	if [ -z "$$image" ]; then \
	  image='$(DEMO_IMAGE)'; \
	  if [ ! -e "$$image" ]; then \
	    echo "run: creating $$image ($(DEMO_SIZE))"; \
	    $(QEDFUSE) create "$$image" $(DEMO_SIZE); \
	  fi; \
	fi; \
	[ -f "$$image" ] || { echo "run: image '$$image' not found" >&2; exit 1; }; \
	state=$$($(VENV_BIN)/python -m qedfuse.mount state '$(MNT)'); \
	mnt_abs=$$(sed -n 2p <<<"$$state"); state=$$(sed -n 1p <<<"$$state"); \
	case "$$state" in \
	  none) mkdir -p '$(MNT)'; $(QEDFUSE) mount "$$image" '$(MNT)';; \
	  serving*) echo "run: $$mnt_abs is already mounted (daemon pid $${state#serving }); not remounting";; \
	  stopped*) echo "run: $$mnt_abs is served by a stopped daemon; resume it with: kill -CONT $${state#stopped }" >&2; exit 1;; \
	  stale) echo "run: $$mnt_abs is a stale mount (daemon gone); clean it up with: $(QEDFUSE) umount $$mnt_abs" >&2; exit 1;; \
	  unanswering) echo "run: $$mnt_abs is mounted but does not answer; detach it with: $(QEDFUSE) umount --lazy $$mnt_abs" >&2; exit 1;; \
	  *) echo "run: $$mnt_abs is already a mount point ($$state); not mounting over it" >&2; exit 1;; \
	esac; \
	stem=$$(basename "$$image"); stem=$${stem%.*}; \
	raw="$$mnt_abs/$$stem.raw"; \
	echo; \
	echo "raw disk:   $$raw"; \
	echo "unmount:    $(QEDFUSE) umount --wait $$mnt_abs"

# --------------------------------------------------------------------------- install
# The copy does not depend on the clone: deleting or moving the clone afterwards leaves
# mount(8), fstab entries and the systemd units working.  The new venv is built next to the
# old one and swapped in at the end, so a failed install leaves the old copy in place.
install: deps
	@if [ -z '$(DESTDIR)' ] && [ '$(PREFIX)' = /usr/local ] && [ "$$(id -u)" -ne 0 ]; then \
	  echo "install: must be root for PREFIX=/usr/local; run: sudo make install" >&2; exit 1; fi
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	  || { echo "install: $(PYTHON) is older than 3.11; set PYTHON=python3.11" >&2; exit 1; }
	rm -rf '$(DESTDIR)$(LIBDIR).new'
	mkdir -p '$(dir $(DESTDIR)$(LIBDIR))'
	$(PYTHON) -m venv '$(DESTDIR)$(LIBDIR).new'
	'$(DESTDIR)$(LIBDIR).new/bin/python' -m pip install --quiet --upgrade pip
	'$(DESTDIR)$(LIBDIR).new/bin/python' -m pip install --quiet '$(abspath .)'
	grep -rlI --null -e '$(DESTDIR)$(LIBDIR).new' '$(DESTDIR)$(LIBDIR).new/bin' \
	  '$(DESTDIR)$(LIBDIR).new/pyvenv.cfg' | xargs -0 -r sed -i 's|$(DESTDIR)$(LIBDIR).new|$(LIBDIR)|g'
	'$(DESTDIR)$(LIBDIR).new/bin/python' -m qedfuse.docgen man > '$(DESTDIR)$(LIBDIR).new/qedfuse.1'
	'$(DESTDIR)$(LIBDIR).new/bin/python' -m qedfuse.docgen bash > '$(DESTDIR)$(LIBDIR).new/qedfuse.bash'
	rm -rf '$(DESTDIR)$(LIBDIR).old'
	if [ -e '$(DESTDIR)$(LIBDIR)' ]; then mv '$(DESTDIR)$(LIBDIR)' '$(DESTDIR)$(LIBDIR).old'; fi
	mv '$(DESTDIR)$(LIBDIR).new' '$(DESTDIR)$(LIBDIR)'
	rm -rf '$(DESTDIR)$(LIBDIR).old'
	install -d '$(DESTDIR)$(BINDIR)' '$(DESTDIR)$(MANDIR)/man1' '$(DESTDIR)$(BASHCOMPDIR)'
	ln -sfn '$(LIBDIR)/bin/qedfuse' '$(DESTDIR)$(BINDIR)/qedfuse'
	install -m 0644 '$(DESTDIR)$(LIBDIR)/qedfuse.1' '$(DESTDIR)$(MANDIR)/man1/qedfuse.1'
	install -m 0644 '$(DESTDIR)$(LIBDIR)/qedfuse.bash' '$(DESTDIR)$(BASHCOMPDIR)/qedfuse'
ifneq ($(SYSTEMD_UNITS),)
	install -d '$(DESTDIR)$(SYSTEMDDIR)'
	for unit in $(SYSTEMD_UNITS); do \
	  sed 's|/usr/local/bin/qedfuse|$(BINDIR)/qedfuse|g' "$$unit" > '$(DESTDIR)$(SYSTEMDDIR)/'"$$(basename "$$unit")"; \
	  chmod 0644 '$(DESTDIR)$(SYSTEMDDIR)/'"$$(basename "$$unit")"; \
	done
	@if [ -z '$(DESTDIR)' ] && [ '$(SYSTEMDDIR)' = /etc/systemd/system ] \
	    && [ "$$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then \
	  systemctl daemon-reload; \
	else \
	  echo "install: skipped systemctl daemon-reload (systemd not PID 1, or a staged install)"; \
	fi
endif
	@echo "install: $(BINDIR)/qedfuse -> $(LIBDIR)/bin/qedfuse ($$('$(DESTDIR)$(LIBDIR)/bin/python' -m qedfuse --version | head -1))"

uninstall:
	rm -rf '$(DESTDIR)$(LIBDIR)'
	rm -f '$(DESTDIR)$(BINDIR)/qedfuse' '$(DESTDIR)$(MANDIR)/man1/qedfuse.1' \
	  '$(DESTDIR)$(BASHCOMPDIR)/qedfuse'
	for unit in $(SYSTEMD_UNITS); do rm -f '$(DESTDIR)$(SYSTEMDDIR)/'"$$(basename "$$unit")"; done

# --------------------------------------------------------------------------- bench
bench: deps venv
	@[ -d bench ] || { echo "bench: no bench/ directory yet" >&2; exit 1; }
	$(VENV_BIN)/python -m bench $(BENCH_ARGS)

# --------------------------------------------------------------------------- clean
clean:
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache .pytest_cache .hypothesis bench/results/tmp
	rm -rf *.egg-info
	find . -path ./.git -prune -o -type d -name __pycache__ -exec rm -rf {} +

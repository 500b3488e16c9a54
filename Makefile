# obd-autoconvert: the two commands of the README.
#   make run    set up, then run the webhook service on its embedded defaults (127.0.0.1:8080)
#   make test   set up (Debian packages, virtualenv), then lint and run the whole test suite
# Debian packages are installed with apt-get when running as root, or through sudo when that
# works without a password; otherwise the missing packages are named and the command stops.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell sha256sum < pyproject.toml | cut -c1-12)

RUN_DEBS := python3 python3-venv
# podman, debootstrap, runc: tests/test_container.py builds and runs the Dockerfile (README "Run it in a container").
TEST_DEBS := $(RUN_DEBS) docker-registry skopeo umoci apache2-utils e2fsprogs redis-server chromium chromium-driver \
             podman debootstrap runc

.PHONY: run test lint debs-run debs-test venv _debs

run: debs-run venv
	$(VENV)/bin/obd-webhook serve

test: debs-test venv lint
	$(VENV)/bin/python -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

debs-run:
	@$(MAKE) --no-print-directory _debs DEBS="$(RUN_DEBS)"

debs-test:
	@$(MAKE) --no-print-directory _debs DEBS="$(TEST_DEBS)"

# Install only what is missing, so a ready machine needs no network and no root.
_debs:
	@missing=$$(for p in $(DEBS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo"; \
	else echo "Missing Debian packages:" $$missing; \
	     echo "Run this command as root, or first: sudo apt-get install -y" $$missing; exit 1; fi; \
	echo "Installing Debian packages:" $$missing; \
	$$sudo apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing

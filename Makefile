# meshca: the two commands a new user runs are `make demo` and `make test`.
CARGO ?= cargo

.PHONY: all deps build demo test lint fmt clean bench bench-federation

all: build

# System packages the demo and the tests need (softhsm2, opensc, openssl, curl),
# installed only when missing.
deps:
	@./scripts/install-deps.sh

build:
	$(CARGO) build --release --locked

# Root in SoftHSM, signer up, two clusters get intermediates under one root,
# an mTLS handshake across them. Leaves everything in var/demo/.
demo: deps build
	@./scripts/demo.sh

# The whole suite: unit tests and integration tests against real SoftHSM tokens,
# a real signer on 127.0.0.1, and openssl as the independent verifier.
test: deps
	$(CARGO) test --locked

# Benchmarks: numbers to read, not tests (README "Performance").
bench: bench-federation

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

# One entry point: what CI runs is what a developer runs.
# The tests need root (they boot real containers on a btrfs loop file).
CARGO ?= cargo

.PHONY: build lint test unit e2e bench

build:
	$(CARGO) build --workspace --bins

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Unit tests, then the end-to-end tests (one test binary at a time: they share the host).
test: build
	bash deploy/tests/cluster-guards.sh
	$(CARGO) test --workspace -- --test-threads=1

unit:
	$(CARGO) test --workspace --lib --bins

e2e: build
	$(CARGO) test -p berth-tests -- --test-threads=1 --nocapture

# The scheduler simulation (10,000 instances onto 1,000 simulated nodes).
bench:
	$(CARGO) bench -p berth-controller --bench scheduler

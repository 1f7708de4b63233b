# One entry point: what CI runs is what a developer runs.
# The tests need root (they boot real containers on a btrfs loop file).
CARGO ?= cargo

.PHONY: build lint test unit e2e bench bench-scheduler

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

# The benchmark suite: Berth (the `berth` CLI's default remote, e.g. deploy/quickstart.sh's)
# beside LXD (deploy/lxd-reference.sh) when it is there. Options in BENCH_ARGS, e.g.
# `make bench BENCH_ARGS="--runs 2 --density 20"`; see docs/benchmarks.md.
BENCH_ARGS ?=
bench:
	$(CARGO) build --release --workspace --bins
	"$${CARGO_TARGET_DIR:-target}/release/berth-bench" $(BENCH_ARGS)

# The scheduler simulation (10,000 instances onto 1,000 simulated nodes).
bench-scheduler:
	$(CARGO) bench -p berth-controller --bench scheduler

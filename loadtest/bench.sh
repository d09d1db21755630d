#!/usr/bin/env bash
# The one-command benchmark: builds the gateway and ingest-bench in release mode, then runs the benchmark
# (gateway vs HTTP ceiling, COPY sink ceiling and naive baseline) with the arguments given, e.g. --quick.
# `loadtest/bench.sh --help` lists the options; the report goes to loadtest/results/.
set -euo pipefail
cd "$(dirname "$0")/.."

# Checked before the build, which takes minutes, rather than after it.
if ! command -v wrk >/dev/null 2>&1; then
  echo "wrk is not installed; it is the benchmark's load generator." >&2
  echo "Install it (Debian/Ubuntu: apt-get install -y wrk; others: https://github.com/wg/wrk) and run again." >&2
  exit 2
fi

cargo build --release -p ingest-gateway -p ingest-bench
exec "${CARGO_TARGET_DIR:-target}/release/ingest-bench" "$@"

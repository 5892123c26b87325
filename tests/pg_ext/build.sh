#!/usr/bin/env bash
# Builds the test-only Postgres extension into OUTDIR (nothing is written to the source tree
# and nothing is installed) and prints the absolute path of the built .so, which Postgres can
# load by path: shared_preload_libraries = '/abs/path/neon_lfc_test.so'.
#
# Usage: tests/pg_ext/build.sh OUTDIR   (PG_CONFIG overrides the pg_config used)
set -euo pipefail

src="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:?usage: $0 OUTDIR}"
pg_config="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"

if [[ ! -x "$pg_config" ]]; then
    echo "error: $pg_config not found; install postgresql-server-dev-15 (cargo xtask setup does)" >&2
    exit 1
fi
pgxs="$("$pg_config" --pgxs)"
if [[ ! -f "$pgxs" ]]; then
    echo "error: PGXS ($pgxs) is missing; install postgresql-server-dev-15" >&2
    exit 1
fi

mkdir -p "$out"
out="$(cd "$out" && pwd)"
# Build output goes to stderr so stdout carries only the .so path.
make -C "$out" -f "$src/Makefile" PG_CONFIG="$pg_config" >&2
echo "$out/neon_lfc_test.so"

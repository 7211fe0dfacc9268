#!/usr/bin/env bash
# Install (when missing) the load tools `make bench` drives: ghz (gRPC load, from the Go
# module proxy) and RabbitMQ's PerfTest (from Maven Central, run from its jars).
# Idempotent: a tool already installed is left alone, so a second run takes a moment.
# Prints where PerfTest's jars are; scripts/bench.py finds both at the same places.
set -euo pipefail

STATE_DIR=${ENERGY_STATE_DIR:-$HOME/.local/state/energy-platform}
GOBIN=${GOBIN:-$(go env GOPATH 2>/dev/null || echo "$HOME/go")/bin}
# Explicit versions: the Go proxy mirror here refuses `@v/list`, so `@latest` cannot resolve,
# and Maven Central's newest perf-test here is 2.22.1.
GHZ_VERSION=v0.120.0
PERF_TEST_VERSION=2.22.1
PERF_TEST_DIR=${BENCH_PERF_TEST_DIR:-$STATE_DIR/tools/perf-test-$PERF_TEST_VERSION}

log() { printf '[bench-tools] %s\n' "$*"; }
export PATH="$GOBIN:$PATH"

# Same fallback as scripts/services.sh: build the downloaded module when `go install`
# trips over a refused version-list query.
go_build_tool() {  # go_build_tool MODULE VERSION PACKAGE BINARY
  local dir src
  dir=$(go mod download -json "$1@$2" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  src=$(mktemp -d)
  cp -r "$dir/." "$src" && chmod -R u+w "$src"
  (cd "$src" && go build -o "$GOBIN/$4" "./$3")
  rm -rf "$src"
}

if ! command -v ghz >/dev/null 2>&1; then
  log "building ghz $GHZ_VERSION (about a minute, once)"
  mkdir -p "$GOBIN"
  GOBIN="$GOBIN" go install "github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION" \
    || go_build_tool github.com/bojand/ghz "$GHZ_VERSION" cmd/ghz ghz
fi

# Maven Central has PerfTest as a plain jar with dependencies (the all-in-one jar is a
# GitHub release asset, out of reach here): resolve them with Maven into lib/.
if [ ! -f "$PERF_TEST_DIR/lib/perf-test-$PERF_TEST_VERSION.jar" ]; then
  command -v java >/dev/null 2>&1 || { log "ERROR: java is needed for PerfTest"; exit 1; }
  command -v mvn >/dev/null 2>&1 || { log "ERROR: mvn is needed to fetch PerfTest"; exit 1; }
  log "fetching com.rabbitmq:perf-test:$PERF_TEST_VERSION and its dependencies"
  mkdir -p "$PERF_TEST_DIR"
  cat >"$PERF_TEST_DIR/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.bench</groupId>
  <artifactId>perf-test-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>com.rabbitmq</groupId>
      <artifactId>perf-test</artifactId>
      <version>$PERF_TEST_VERSION</version>
    </dependency>
  </dependencies>
</project>
POM
  rm -rf "$PERF_TEST_DIR/lib.partial"
  mvn -q -B -Dstyle.color=never -f "$PERF_TEST_DIR/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$PERF_TEST_DIR/lib.partial"
  rm -rf "$PERF_TEST_DIR/lib"
  mv "$PERF_TEST_DIR/lib.partial" "$PERF_TEST_DIR/lib"  # only a complete lib/ counts
fi

log "ghz $(command -v ghz); PerfTest $PERF_TEST_DIR/lib"

#!/usr/bin/env bash
# Install (when missing) the tools that check the Helm chart offline: helm and kubeconform,
# both built from the Go module proxy into Go's bin folder, like grpcurl (scripts/services.sh)
# and ghz (scripts/bench_tools.sh). Idempotent: a tool already at its pinned version is left
# alone, so a second run takes a moment. On a new machine the build takes a few minutes
# (helm is most of it; see the README's "Kubernetes" section for the measured time).
set -euo pipefail

GOBIN=${GOBIN:-$(go env GOPATH 2>/dev/null || echo "$HOME/go")/bin}
# Explicit versions: the Go proxy mirror here refuses some `@v/list` queries, so `@latest`
# cannot be relied on. helm's go.mod asks for Go 1.26.0; this machine has 1.26.
HELM_VERSION=v3.22.0
KUBECONFORM_VERSION=v0.8.0

log() { printf '[helm-tools] %s\n' "$*"; }
export PATH="$GOBIN:$PATH"
mkdir -p "$GOBIN"

# Build a downloaded module in a writable copy of itself: needs only exact-version requests
# (same as scripts/services.sh), and keeps the module's own go.sum.
go_build_tool() {  # go_build_tool MODULE VERSION PACKAGE BINARY [LDFLAGS]
  local dir src
  dir=$(go mod download -json "$1@$2" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -n "$dir" ] || { log "ERROR: go mod download $1@$2 failed"; return 1; }
  src=$(mktemp -d)
  cp -r "$dir/." "$src" && chmod -R u+w "$src"
  (cd "$src" && CGO_ENABLED=0 go build -trimpath -ldflags "${5:-}" -o "$GOBIN/$4.partial" "./$3")
  mv "$GOBIN/$4.partial" "$GOBIN/$4"  # only a complete binary counts
  rm -rf "$src"
}

helm_version() { helm version --template '{{.Version}}' 2>/dev/null || true; }
if [ "$(helm_version)" != "$HELM_VERSION" ]; then
  log "building helm $HELM_VERSION (a few minutes, once)"
  # As helm's Makefile does: the version, and the Kubernetes version `helm template` assumes
  # by default from the client-go helm is built with (v0.37 -> 1.37).
  k8s_minor=37
  flags="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  flags+=" -X helm.sh/helm/v3/internal/version.metadata="
  for pkg in pkg/lint/rules pkg/chartutil; do
    flags+=" -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$k8s_minor"
  done
  go_build_tool helm.sh/helm/v3 "$HELM_VERSION" cmd/helm helm "$flags"
fi

kubeconform_version() { kubeconform -v 2>/dev/null || true; }
if [ "$(kubeconform_version)" != "$KUBECONFORM_VERSION" ]; then
  log "building kubeconform $KUBECONFORM_VERSION"
  go_build_tool github.com/yannh/kubeconform "$KUBECONFORM_VERSION" cmd/kubeconform kubeconform \
    "-X main.version=$KUBECONFORM_VERSION"
fi

log "helm $(helm_version) $(command -v helm); kubeconform $(kubeconform_version) $(command -v kubeconform)"

#!/usr/bin/env bash
# Builds the older kubectl (1.32) the suite runs beside the test bed's own,
# from the published k8s.io/kubectl module (go/kubectl-old), into a cache
# keyed by version and by the module's go.sum; prints the binary's path. A
# warm cache makes this a no-op. Separate from build.sh so that adding it did
# not move that script's cache keys.
#
# Environment: TOWER_TESTBED_CACHE (default ~/.cache/tower-testbed).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${TOWER_TESTBED_CACHE:-$HOME/.cache/tower-testbed}
mod="$here/go/kubectl-old"
# k8s.io/kubectl v0.32.x is kubectl v1.32.x.
version=$(awk '$1 == "k8s.io/kubectl" {print $2}' "$mod/go.mod" | sed 's/^v0\./v1./')
key=$(cat "$mod/go.mod" "$mod/go.sum" "$mod/main.go" "$0" | sha256sum | cut -c1-12)
out="$cache/kubectl-$version-$key"
bin="$out/kubectl-${version%.*}"

if [[ ! -f "$out/.complete" ]]; then
  export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local
  mkdir -p "$out"
  minor=${version#v1.}; minor=${minor%%.*}
  ldflags="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $p.gitVersion=$version -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  start=$SECONDS
  printf '[testbed] building kubectl %s (a cold build takes a few minutes on 2 cores)…\n' "$version" >&2
  (cd "$mod" && go build -trimpath -ldflags "$ldflags" -o "$bin" .)
  printf '[testbed] built kubectl %s in %ss\n' "$version" "$((SECONDS - start))" >&2
  touch "$out/.complete"
fi
echo "$bin"

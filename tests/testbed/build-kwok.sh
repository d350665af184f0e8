#!/usr/bin/env bash
# Builds kwok, which plays the kubelet of a fake node on a test member cluster,
# from the published sigs.k8s.io/kwok module (go/kwok) into a cache keyed by
# version and by the module's go.sum, and copies kwok's own "fast" node and pod
# stages (YAML shipped in that module) beside it; prints the directory holding
# `kwok` and `stages/`. A warm cache makes this a no-op.
#
# Environment: TOWER_TESTBED_CACHE (default ~/.cache/tower-testbed).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${TOWER_TESTBED_CACHE:-$HOME/.cache/tower-testbed}
mod="$here/go/kwok"
version=$(awk 'NF >= 2 && $(NF-1) == "sigs.k8s.io/kwok" {print $NF}' "$mod/go.mod")
key=$(cat "$mod/go.mod" "$mod/go.sum" "$mod/tools.go" "$0" | sha256sum | cut -c1-12)
out="$cache/kwok-$version-$key"

if [[ ! -f "$out/.complete" ]]; then
  export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local
  mkdir -p "$out/stages"
  start=$SECONDS
  printf '[testbed] building kwok %s (a cold build takes a few minutes on 2 cores)…\n' "$version" >&2
  (cd "$mod" && go build -trimpath \
    -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$version" \
    -o "$out/kwok" sigs.k8s.io/kwok/cmd/kwok)
  # Without stages kwok refuses to start; these make nodes Ready and pods
  # Running at once, and let pods be deleted.
  src=$(cd "$mod" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)/kustomize/stage
  for stage in node/fast/node-initialize pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete; do
    install -m 0644 "$src/$stage.yaml" "$out/stages/${stage##*/}.yaml"
  done
  printf '[testbed] built kwok %s in %ss\n' "$version" "$((SECONDS - start))" >&2
  touch "$out/.complete"
fi
echo "$out"

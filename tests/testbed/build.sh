#!/usr/bin/env bash
# Builds the test bed's binaries (etcd, kube-apiserver, kubectl, helm)
# from the Go module proxy into a cache keyed by version and by the tool
# modules' go.sum. A warm cache makes this a no-op.
#
#   tests/testbed/build.sh            # build (or reuse) everything
#   tests/testbed/build.sh --print    # print the bin directory only
#
# Environment: TOWER_TESTBED_CACHE (default ~/.cache/tower-testbed).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${TOWER_TESTBED_CACHE:-$HOME/.cache/tower-testbed}
KUBE_VERSION=v1.35.8
ETCD_VERSION=$(awk '/go.etcd.io\/etcd\/server\/v3 /{print $NF}' "$here/go/etcd/go.mod")
HELM_VERSION=$(awk '/helm.sh\/helm\/v4 /{print $NF}' "$here/go/helm/go.mod")

key() { cat "$here/go/$1/go.mod" "$here/go/$1/go.sum" "$here/build.sh" | sha256sum | cut -c1-12; }
kube_dir="$cache/kube-$KUBE_VERSION-$(key kube)"
etcd_dir="$cache/etcd-$ETCD_VERSION-$(key etcd)"
helm_dir="$cache/helm-$HELM_VERSION-$(key helm)"
bin="$cache/bin"

if [[ "${1:-}" == "--print" ]]; then echo "$bin"; exit 0; fi

export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local
mkdir -p "$cache" "$bin"

step() { printf '[testbed] %s\n' "$*" >&2; }

build() { # dir module-dir outputs...
  local out=$1 mod=$2; shift 2
  if [[ -f "$out/.complete" ]]; then step "cached: $out"; return; fi
  mkdir -p "$out"
  local start=$SECONDS
  for target in "$@"; do
    local name=${target##*/} pkg=$target ldflags="-s -w"
    [[ $name == . ]] && name=etcd
    if [[ $mod == kube ]]; then
      local vpkg=k8s.io/component-base/version cpkg=k8s.io/client-go/pkg/version
      local minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
      for p in $vpkg $cpkg; do
        ldflags+=" -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
        ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
      done
    fi
    [[ $mod == helm ]] && ldflags+=" -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION"
    step "building $name ($mod module; a cold build takes several minutes on 2 cores)…"
    (cd "$here/go/$mod" && go build -trimpath -ldflags "$ldflags" -o "$out/$name" "$pkg")
    step "built $name in $((SECONDS - start))s"
  done
  touch "$out/.complete"
}

build "$etcd_dir" etcd .
build "$kube_dir" kube k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl
build "$helm_dir" helm helm.sh/helm/v4/cmd/helm

for f in "$etcd_dir/etcd" "$kube_dir/kube-apiserver" "$kube_dir/kubectl" "$helm_dir/helm"; do
  ln -sf "$f" "$bin/$(basename "$f")"
done
"$bin/etcd" --version | sed -n 1p >&2
"$bin/kube-apiserver" --version >&2
"$bin/helm" version --short >&2
echo "$bin"

#!/usr/bin/env bash
# Runs Tower's whole test suite on a fresh machine: installs what the suite
# needs (OpenSSH client, tinyproxy; buildah as root, for the image test),
# builds the test-bed binaries (etcd, kube-apiserver, kubectl 1.35 and 1.32,
# helm, kwok) from the Go module proxy into a cache, then runs every test, and
# the tunnel's core tests once more with the agents on wss://.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

# Debian packages the suite drives: `need <command> <package> <why>`.
apt_updated=
need() {
  command -v "$1" >/dev/null 2>&1 || [[ -x "/usr/sbin/$1" ]] && return 0
  step "installing $2 ($3)"
  local sudo=
  [[ $(id -u) -eq 0 ]] || sudo=sudo
  if [[ -z $apt_updated ]]; then
    $sudo apt-get update -qq
    apt_updated=1
  fi
  $sudo apt-get install -y -qq "$2" >/dev/null
}
need ssh openssh-client "used as an interop agent"
need tinyproxy tinyproxy-bin "a real HTTP CONNECT proxy for the agent's proxy tests"

# The image test (tests/tests/images.rs) builds the OCI images with buildah
# (scripts/images.sh, one release build, cached) and runs them under chroot,
# which needs root. As root it must run, not skip: TOWER_REQUIRE_IMAGES.
if [[ $(id -u) -eq 0 ]]; then
  if ! command -v buildah >/dev/null 2>&1; then
    step "installing buildah (builds the OCI images without a daemon)"
    apt-get update -qq && apt-get install -y -qq buildah >/dev/null
  fi
  export TOWER_REQUIRE_IMAGES=1
fi

step "test-bed binaries (cold: ~10 min on 2 cores; warm: a no-op)"
tests/testbed/build.sh >/dev/null
tests/testbed/build-kubectl-old.sh >/dev/null
tests/testbed/build-kwok.sh >/dev/null

step "building the workspace"
cargo build --workspace --all-targets --locked

step "running the tests"
start=$SECONDS
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked --no-fail-fast --lib --bins --tests -- --test-threads=4 2>&1 | tee "$log" || status=$?
step "the tunnel's core tests again, the agents on wss:// (SSH inside a WebSocket over TLS)"
TOWER_TEST_TRANSPORT=wss cargo test -p tower-tests --locked --no-fail-fast --test tunnel --test hol -- --test-threads=4 2>&1 | tee -a "$log" || status=$?
passed=$(grep -Eo '^test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' "$log" | awk '{s+=$1} END {print s+0}')
echo "test suite finished in $((SECONDS - start))s" >&2
echo "cargo: ${passed} passed, ${failed} failed"
exit "$status"

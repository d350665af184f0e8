#!/usr/bin/env bash
# Builds the tower-server and tower-agent OCI images as archives with buildah,
# without a daemon and without pulling a base image:
#
#   target/images/tower-server-<appVersion>.oci.tar
#   target/images/tower-agent-<appVersion>.oci.tar
#
# Each image is one layer on `scratch`: the stripped release binary in
# /usr/local/bin, the shared libraries it links (found with ldd and copied from
# this machine), /etc/passwd and /etc/group with the non-root user 65532
# ("nonroot"), the CA bundle, /etc/nsswitch.conf and an empty /tmp. It runs as
# 65532:65532 and has no shell. The repository and tag are the charts' own
# (image.repository in values.yaml, appVersion in Chart.yaml), so a chart
# installed with its defaults names exactly these images. The Containerfile at
# the repository root describes the same images for builders with a registry.
#
# Usage: scripts/images.sh [--force]
#   --force   assemble the images even when the archives are newer than the
#             binaries (the release build itself is always cargo's to judge)
# Environment: TOWER_REVISION overrides the git revision (as for build.rs).
# Exit status 3: buildah is missing and cannot be installed here.
#
# Progress goes to stderr; stdout gets one line per image: path, size, name.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '==> %s\n' "$*" >&2; }
die() { printf 'images.sh: %s\n' "$*" >&2; exit "${2:-1}"; }

force=false
for arg in "$@"; do
  case "$arg" in
    --force) force=true ;;
    -h | --help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $arg (try --help)" ;;
  esac
done

# --- what to build -----------------------------------------------------------

chart_value() { # chart_value <file> <key>: the first `key: value` at any depth, unquoted
  sed -n "s/^[[:space:]]*$2:[[:space:]]*//p" "$1" | head -n1 | sed 's/[[:space:]]*#.*$//; s/^"\(.*\)"$/\1/'
}
source_url=$(sed -n 's/^repository[[:space:]]*=[[:space:]]*"\(.*\)"/\1/p' Cargo.toml | head -n1)
revision=${TOWER_REVISION:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
short_revision=$revision
[[ $revision =~ ^[0-9a-fA-F]{7,}$ ]] && short_revision=${revision:0:7}
if [[ -z ${TOWER_REVISION:-} ]] && [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then
  step "note: the work tree has uncommitted changes; the images are labelled with HEAD ($short_revision)"
fi
# Reproducible timestamps: the commit's time, not the build's.
timestamp=$(git log -1 --format=%ct 2>/dev/null || true)

# --- buildah -----------------------------------------------------------------

if ! command -v buildah >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    step "installing buildah (Debian package; no daemon needed)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah >/dev/null; } ||
      die "apt-get install buildah failed" 3
  else
    die "buildah is not installed, and installing it needs root and apt-get (apt-get install buildah)" 3
  fi
fi
# vfs: no overlay mount or fuse needed; the layers here are small.
bah() { buildah --storage-driver vfs "$@"; }

# --- release binaries --------------------------------------------------------

step "release build (cargo build --release --locked -p tower-server -p tower-agent)"
start=$SECONDS
cargo build --release --locked -p tower-server -p tower-agent >&2
step "release build done in $((SECONDS - start))s"

# --- one image ---------------------------------------------------------------

mkdir -p target/images
built_any=false

build_image() { # build_image <binary name> <chart dir> <description>
  local name=$1 chart=$2 description=$3
  local bin=target/release/$name
  local version repository out root
  version=$(chart_value "$chart/Chart.yaml" appVersion)
  repository=$(chart_value "$chart/values.yaml" repository)
  [[ -n $version && -n $repository ]] || die "no appVersion or image.repository in $chart"
  out=target/images/$name-$version.oci.tar
  local ref=$repository:$version

  if ! $force && [[ -f $out && $out -nt $bin && $out -nt $0 ]]; then
    step "$name: $out is newer than $bin; kept (--force rebuilds)"
    report "$name" "$out" "$ref"
    return
  fi

  local got
  got=$("$bin" --version)
  [[ $got == "$name $version (rev $short_revision)" ]] ||
    die "$bin --version says '$got', expected '$name $version (rev $short_revision)' (chart appVersion vs Cargo version, or HEAD moved during the build)"

  step "$name: staging the root filesystem"
  root=target/images/$name-rootfs
  rm -rf "$root"
  mkdir -p "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/tmp"
  chmod 1777 "$root/tmp"
  if command -v strip >/dev/null 2>&1; then
    strip -o "$root/usr/local/bin/$name" "$bin"
  else
    step "$name: no strip here; the binary keeps its debug line tables"
    cp "$bin" "$root/usr/local/bin/$name"
  fi
  chmod 0755 "$root/usr/local/bin/$name"
  if [[ $name == tower-agent ]]; then
    # KubeSphere's own agent Deployment runs `/agent` (3.4
    # pkg/kapis/cluster/v1alpha1/handler.go, generateDefaultDeployment): with
    # this path, swapping only its image for this one works.
    ln -s usr/local/bin/tower-agent "$root/agent"
  fi
  # The dynamic loader and every library the binary links, at the paths ldd
  # resolves them to (the loader's own default search path finds them there).
  local lib libs
  if ldd "$bin" | grep -q 'not found'; then
    die "$name: ldd finds no $(ldd "$bin" | grep 'not found')"
  fi
  libs=$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u)
  for lib in $libs; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
    chmod 0755 "$root$lib"
  done
  cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat >"$root/etc/group" <<'EOF'
root:x:0:
nonroot:x:65532:
EOF
  # Name lookups: /etc/hosts first, then DNS (/etc/resolv.conf, which the
  # container runtime mounts); both are built into glibc >= 2.34.
  printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$root/etc/nsswitch.conf"
  local bundle=/etc/ssl/certs/ca-certificates.crt
  if [[ ! -s $bundle ]]; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
      step "installing ca-certificates (the images carry its bundle)"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ca-certificates >/dev/null
    fi
    [[ -s $bundle ]] || die "no CA bundle at $bundle (apt-get install ca-certificates)"
  fi
  cp -L "$bundle" "$root$bundle"
  chmod 0644 "$root/etc/passwd" "$root/etc/group" "$root/etc/nsswitch.conf" "$root$bundle"
  find "$root" -type d ! -path "$root/tmp" -exec chmod 0755 {} +

  step "$name: buildah from scratch, copy, config, commit → $out ($ref)"
  local ctr
  ctr=$(bah from --quiet --name "tower-image-$name-$$" scratch)
  # shellcheck disable=SC2064 # the container's name is known now
  trap "buildah --storage-driver vfs rm '$ctr' >/dev/null 2>&1 || true" EXIT
  bah copy --quiet "$ctr" "$root" / >/dev/null
  bah config \
    --entrypoint "[\"/usr/local/bin/$name\"]" \
    --cmd '' \
    --user 65532:65532 \
    --workingdir / \
    --created-by "scripts/images.sh: buildah from scratch, copy of a staged root filesystem" \
    --env PATH=/usr/local/bin \
    --os linux --arch amd64 \
    --label "org.opencontainers.image.title=$name" \
    --label "org.opencontainers.image.description=$description" \
    --label "org.opencontainers.image.version=$version" \
    --label "org.opencontainers.image.revision=$revision" \
    --label "org.opencontainers.image.source=$source_url" \
    --label "org.opencontainers.image.licenses=Apache-2.0" \
    "$ctr"
  rm -f "$out.part"
  local commit_args=(--quiet --format oci --rm)
  [[ -n $timestamp ]] && commit_args+=(--timestamp "$timestamp")
  bah commit "${commit_args[@]}" "$ctr" "oci-archive:$out.part:$ref" >/dev/null
  trap - EXIT
  mv "$out.part" "$out"
  rm -rf "$root"
  built_any=true
  report "$name" "$out" "$ref"
}

report() { # report <name> <archive> <ref>: path, archive size and the gzip'd size a registry stores
  local bytes gz
  bytes=$(stat -c %s "$2")
  gz=$(gzip -c "$2" | wc -c)
  awk -v p="$2" -v r="$3" -v b="$bytes" -v g="$gz" 'BEGIN { printf "%s\t%s\t%.1f MB (about %.1f MB gzip)\n", p, r, b / 1e6, g / 1e6 }'
}

build_image tower-server charts/tower-server \
  "Tower server: SSH listener for member agents and HTTPS gateway to their clusters"
build_image tower-agent charts/tower-agent \
  "Tower agent: dials the Tower server over SSH and serves its member cluster through the tunnel"

if $built_any; then
  step "done; push with: skopeo copy oci-archive:<archive> docker://<registry>/<repository>:<tag> (see README)"
fi

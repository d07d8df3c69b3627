#!/usr/bin/env bash
# Build a real kube-apiserver for the integration tests from Debian bookworm's `kubernetes` source
# package, which vendors its Go dependencies and so builds without the Go module proxy.
#
#   bash scripts/build-kube-apiserver.sh        # prints the path of the cached binary on stdout
#
# The binary is cached under ${MOE_K8S_CACHE:-$HOME/.cache/moe-cluster/k8s}/<version>/;
# when it is there, nothing is built again. It also makes sure the runtime tools the tests need
# (etcd, openssl) are installed. Progress goes to stderr, so a caller can write
#   export MOE_KUBE_APISERVER=$(bash scripts/build-kube-apiserver.sh)
#
# Needs Debian bookworm (or a derivative with its archive) and root or sudo for apt-get.
# Build time: 5 to 10 minutes on 2 cores; the binary is about 110 MB.
set -euo pipefail

# Upstream Kubernetes version of bookworm's package (Debian calls it 1.20.5+really1.20.2). Only the
# upstream tarball is built (Debian's own patches change kubectl's printing, not the server), so
# the upstream version is the cache key.
version=${MOE_K8S_VERSION:-1.20.2}
cache_root=${MOE_K8S_CACHE:-$HOME/.cache/moe-cluster/k8s}
binary=$cache_root/$version/kube-apiserver

log() { echo "build-kube-apiserver: $*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    log "need root or sudo to run: $*"
    exit 1
  fi
}

apt_install() {
  local missing=()
  local pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
      missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${missing[@]}" >&2
}

# Runtime tools for tests/k8s/apiserver.py, wanted even when the binary is cached.
runtime_packages=(etcd-server openssl)

if [ -x "$binary" ]; then
  apt_install "${runtime_packages[@]}" || { as_root apt-get update -q >&2 && \
    apt_install "${runtime_packages[@]}"; }
  log "cached: $binary"
  echo "$binary"
  exit 0
fi

# 1. Source lines for bookworm main, so that `apt-get source` finds the package. apt refuses two
#    entries for one archive with different Signed-By values, so reuse the keyring of the existing
#    deb822 entry when there is one.
debsrc=/etc/apt/sources.list.d/moe-cluster-deb-src.sources
if [ ! -f "$debsrc" ] && ! apt-get source --print-uris kubernetes >/dev/null 2>&1; then
  keyring=$(grep -h -A4 -B4 'deb.debian.org/debian$' /etc/apt/sources.list.d/*.sources 2>/dev/null |
    sed -n 's/^Signed-By: *//p' | head -n1 || true)
  log "adding $debsrc"
  {
    echo "Types: deb-src"
    echo "URIs: http://deb.debian.org/debian"
    echo "Suites: bookworm"
    echo "Components: main"
    if [ -n "$keyring" ]; then echo "Signed-By: $keyring"; fi
  } | as_root tee "$debsrc" >/dev/null
fi
as_root apt-get update -q >&2

# 2. Toolchain (Go 1.19), Debian's reflect2 1.0.2 and the runtime tools.
apt_install golang-go golang-github-modern-go-reflect2-dev make rsync dpkg-dev \
  "${runtime_packages[@]}"

# 3. The source package, unpacked in a scratch directory next to the cache.
mkdir -p "$cache_root"
work=$(mktemp -d "$cache_root/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "downloading the kubernetes source package into $work"
(cd "$work" && apt-get source --download-only kubernetes >&2)
orig=$(ls "$work"/kubernetes_*.orig.tar.* | head -n1)
case "$orig" in
  *_"$version".orig.* | *really"$version".orig.*) ;;
  *) log "expected Kubernetes $version, Debian offers $(basename "$orig")"; exit 1 ;;
esac
mkdir -p "$work/gopath/src/k8s.io/kubernetes"
tar -xf "$orig" -C "$work/gopath/src/k8s.io/kubernetes" --strip-components=1
src=$work/gopath/src/k8s.io/kubernetes

# 4. reflect2 v1.0.1 (vendored) crashes with Go >= 1.18; Debian ships the fixed 1.0.2.
rm -rf "$src/vendor/github.com/modern-go/reflect2"
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$src/vendor/github.com/modern-go/"
rm -f "$src/vendor/github.com/modern-go/reflect2/go.mod"

# 5. GOPATH-mode build through the project's Makefile (a plain `go build` fails on this tree).
log "building cmd/kube-apiserver (5 to 10 minutes on 2 cores)"
start=$SECONDS
(
  cd "$src"
  export GOPATH=$work/gopath GOCACHE=$work/gocache CGO_ENABLED=0
  export KUBE_GIT_VERSION="v$version" KUBE_GIT_TREE_STATE=clean
  make WHAT=cmd/kube-apiserver >&2
)
log "built in $((SECONDS - start)) s"

built=$(find "$src/_output" -type f -name kube-apiserver -perm -u+x | head -n1)
[ -n "$built" ] || { log "no kube-apiserver binary under $src/_output"; exit 1; }
mkdir -p "$(dirname "$binary")"
# Copy, then rename: a concurrent run never sees a half-written binary.
cp "$built" "$binary.tmp.$$"
mv "$binary.tmp.$$" "$binary"
"$binary" --version >&2
echo "$binary"

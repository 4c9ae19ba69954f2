#!/usr/bin/env bash
# Build the patched vcsim from Debian's govmomi 0.24.2 source, offline, in GOPATH mode.
#
# Usage: build.sh OUT_DIR   ->  OUT_DIR/vcsim (skipped when OUT_DIR/vcsim.key matches its inputs)
# Needs: golang-go golang-github-vmware-govmomi-dev (see .ci/vsphere.sh start).
# The system's source under /usr/share/gocode is never modified: govmomi is copied to
# OUT_DIR/gopath, patched there (patch_govmomi.py), and found first on GOPATH.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(mkdir -p "$1" && cd "$1" && pwd)
src=/usr/share/gocode/src/github.com/vmware/govmomi
[ -d "$src/simulator" ] || { echo "build.sh: $src missing: apt-get install golang-github-vmware-govmomi-dev" >&2; exit 1; }
bin="$out/vcsim"
# The binary is keyed on what it is built from (not on mtimes: every fresh clone is newer)
key=$({ cat "$here/main.go" "$here/patch_govmomi.py" "$0"; go version
        dpkg-query -W -f '${Version}' golang-github-vmware-govmomi-dev; } 2>/dev/null \
    | sha256sum | cut -c1-32)
if [ -x "$bin" ] && [ "$(cat "$bin.key" 2>/dev/null)" = "$key" ]; then
    echo "$bin is up to date"; exit 0
fi
gopath="$out/gopath"
rm -rf "$gopath"
mkdir -p "$gopath/src/github.com/vmware" "$gopath/src/vmenv-vcsim"
cp -a "$src" "$gopath/src/github.com/vmware/govmomi"
chmod -R u+w "$gopath/src/github.com/vmware/govmomi"
python3 "$here/patch_govmomi.py" "$gopath/src/github.com/vmware/govmomi"
cp "$here/main.go" "$gopath/src/vmenv-vcsim/main.go"
cd "$gopath/src/vmenv-vcsim"
GO111MODULE=off GOPROXY=off GOFLAGS= GOPATH="$gopath:/usr/share/gocode" \
    GOCACHE="${GOCACHE:-$out/gocache}" go build -o "$bin.part" .
mv "$bin.part" "$bin"
echo "$key" >"$bin.key"
echo "built $bin"

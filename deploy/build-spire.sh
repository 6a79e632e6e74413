#!/usr/bin/env bash
# Build the SPIRE server and agent (the version pinned in deploy/tools/go.mod) from the Go
# module proxy into a cache directory, so only the first build pays (several minutes on 2 cores).
# Usage: deploy/build-spire.sh [OUT_DIR]   (default ~/.cache/tasklease/bin/v1.13.3)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
version="v1.13.3"
out="${1:-${TASKLEASE_SPIRE_BIN_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tasklease/bin/$version}}"
if [[ -x "$out/spire-server" && -x "$out/spire-agent" ]]; then
  echo "SPIRE $version already built in $out"
  exit 0
fi
command -v go >/dev/null || { echo "Go is required to build SPIRE (https://go.dev/dl/ or apt-get install golang)" >&2; exit 1; }
mkdir -p "$out"
cd "$here/tools"
echo "downloading SPIRE $version modules…"
go mod download
echo "compiling spire-server and spire-agent (CGO for the sqlite datastore); one line per package:"
# -v prints each package as it is compiled: that is the progress indicator.
CGO_ENABLED=1 go build -v -trimpath -buildvcs=false -o "$out/" \
  github.com/spiffe/spire/cmd/spire-server github.com/spiffe/spire/cmd/spire-agent 2>&1 \
  | awk -v tty="$([[ -t 1 ]] && echo 1 || echo 0)" '
      { n++ }
      tty == 1 { printf "\r  [%4d packages] %-70.70s", n, $0; fflush(); next }
      n % 100 == 0 { printf "  [%4d packages compiled]\n", n; fflush() }
      END { if (tty == 1) print ""; printf "  %d packages compiled\n", n }'
test -x "$out/spire-server" && test -x "$out/spire-agent"
echo "SPIRE $version built into $out"

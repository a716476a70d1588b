#!/usr/bin/env bash
# Prints the Debian mirror this host's apt uses (the main archive, not -security), so builds
# reuse the host's own configuration instead of naming a mirror anywhere in the repository.
# DEBIAN_MIRROR overrides it; a host without Debian apt sources must set it.
set -euo pipefail

if [[ -n "${DEBIAN_MIRROR:-}" ]]; then
    echo "$DEBIAN_MIRROR"
    exit 0
fi
uris="$(
    # deb822 sources, then one-line sources; options like [signed-by=...] dropped.
    { grep -hsE '^[[:space:]]*URIs:' /etc/apt/sources.list.d/*.sources || true; } | awk '{for (i = 2; i <= NF; i++) print $i}'
    { grep -hsE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list || true; } \
        | sed -E 's/\[[^]]*\]//' | awk '{print $2}'
)"
uris="$(grep -v -- '-security' <<<"$uris" || true)"
# Prefer a Debian archive (path ending in /debian) over third-party repositories.
uri="$(grep -E '/debian/?$' <<<"$uris" | head -n1 || true)"
[[ -n "$uri" ]] || uri="$(head -n1 <<<"$uris")"
if [[ -z "$uri" ]]; then
    echo "debian-mirror.sh: no Debian mirror in this host's apt sources; set DEBIAN_MIRROR" >&2
    exit 1
fi
echo "$uri"

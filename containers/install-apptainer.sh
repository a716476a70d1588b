#!/usr/bin/env bash
# Installs a relocatable Apptainer into a prefix, for Debian 12 hosts (bookworm ships none).
#
# Apptainer comes from Debian's unstable suite on the same mirror the host already uses; it needs
# a newer glibc than bookworm's, so its ELF interpreter and RPATH are pointed at copies of the
# unstable suite's libc, libm, libseccomp and libsqlite3 inside the prefix. The host's apt state
# is never touched (a private apt directory is used), so this is safe to run on a shared machine.
#
#   containers/install-apptainer.sh [PREFIX]      # prints PREFIX/bin on success
#
# Idempotent: an existing, working prefix is reused. Default prefix:
# ${EGM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/egm}/apptainer-$APPTAINER_VERSION
set -euo pipefail

APPTAINER_VERSION="${APPTAINER_VERSION:-1.4.5-2}"
CACHE="${EGM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/egm}"
PREFIX="${1:-$CACHE/apptainer-$APPTAINER_VERSION}"
ARCH_TRIPLET=x86_64-linux-gnu
HOST_TOOLS=(mksquashfs unsquashfs squashfuse newuidmap fakeroot debootstrap patchelf)

say() { echo "install-apptainer: $*" >&2; }

if [[ -x "$PREFIX/bin/apptainer" ]] && "$PREFIX/bin/apptainer" --version >/dev/null 2>&1; then
    echo "$PREFIX/bin"
    exit 0
fi

missing=()
for tool in "${HOST_TOOLS[@]}"; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    packages="squashfs-tools squashfuse uidmap fakeroot debootstrap patchelf"
    if [[ $EUID -eq 0 ]]; then
        say "installing host packages: $packages"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $packages >/dev/null
    else
        say "missing host tools (${missing[*]}): run as root: apt-get install $packages"
        exit 1
    fi
fi

MIRROR="$("$(dirname "${BASH_SOURCE[0]}")/debian-mirror.sh")"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/parts" "$work/debs" "$work/root"
echo "deb $MIRROR sid main" >"$work/sources.list"
apt_private=(-q -o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=$work/parts"
    -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
    # Snapshot mirrors serve an unstable Release file whose Valid-Until has passed.
    -o Acquire::Check-Valid-Until=false -o APT::Sandbox::User=root)
[[ $EUID -eq 0 ]] || apt_private+=(-o Debug::NoLocking=1)
say "fetching apptainer $APPTAINER_VERSION from the unstable suite"
apt-get "${apt_private[@]}" update >/dev/null
(cd "$work/debs" && apt-get "${apt_private[@]}" download \
    "apptainer=$APPTAINER_VERSION" libc6 libseccomp2 libsqlite3-0 >/dev/null)
for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$work/root"; done

staging="$PREFIX.tmp.$$"
rm -rf "$staging"
mkdir -p "$staging/bin" "$staging/lib/$ARCH_TRIPLET" "$staging/lib/runtime" \
    "$staging/lib/var/lib/apptainer/mnt/session" "$staging/var/lib/apptainer/mnt/session"
cp -a "$work/root/usr/bin/apptainer" "$staging/bin/"
cp -a "$work/root/etc" "$staging/etc"
cp -a "$work/root/usr/lib/$ARCH_TRIPLET/apptainer" "$staging/lib/$ARCH_TRIPLET/"
# Apptainer resolves its configuration directory relative to its libexec directory.
ln -s ../etc "$staging/lib/etc"
for lib in ld-linux-x86-64.so.2 libc.so.6 libm.so.6 libseccomp.so.2 libsqlite3.so.0; do
    src="$(find "$work/root" -name "$lib" \( -type f -o -type l \) | head -n1)"
    [[ -n "$src" ]] || { say "library $lib not found in the downloaded packages"; exit 1; }
    cp -L "$src" "$staging/lib/runtime/$lib"
done
runtime="$PREFIX/lib/runtime"
for elf in "$staging/bin/apptainer" "$staging/lib/$ARCH_TRIPLET/apptainer/bin/starter"; do
    patchelf --set-interpreter "$runtime/ld-linux-x86-64.so.2" --force-rpath --set-rpath "$runtime" "$elf"
done
for deb in "$work"/debs/*.deb; do dpkg-deb -f "$deb" Package Version | paste -sd' '; done >"$staging/VERSIONS"

rm -rf "$PREFIX"
mv "$staging" "$PREFIX"
"$PREFIX/bin/apptainer" --version >&2
echo "$PREFIX/bin"

#!/usr/bin/env bash
# System set-up for the container and cluster tests on a Debian 12 machine (what .ci/run calls
# before `make test`). Idempotent; needs root. Installs:
#   - squashfs-tools, squashfuse, uidmap, fakeroot, debootstrap, patchelf: Apptainer's host tools;
#   - slurmctld, slurmd, slurm-client, munge: the one-node cluster ci/slurm-cluster.sh runs;
#   - chromium, chromium-driver: the headless browser that opens the demo's HTML report
#     (tests/report_browser.py, driven through the system's chromedriver);
#   - Apptainer itself into ~/.cache/egm (containers/install-apptainer.sh);
#   - an unprivileged user `egm-build` with subordinate uids/gids: root cannot build images in a
#     sandbox without CAP_SYS_RESOURCE, so containers/build.sh builds as that user (--fakeroot).
# Without root it only says what is missing; the tests that need it then skip (fail under EGM_CI=1).
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(squashfs-tools squashfuse uidmap fakeroot debootstrap patchelf slurmctld slurmd slurm-client munge
          chromium chromium-driver)
BUILD_USER="${EGM_BUILD_USER:-egm-build}"
SUBID_START=200000
SUBID_COUNT=65536

say() { echo "setup-system: $*" >&2; }

if [[ $EUID -ne 0 ]]; then
    say "not root: skipping system set-up (run it as root, or install: ${PACKAGES[*]})"
    exit 0
fi
if [[ ! -f /etc/debian_version ]]; then
    say "not a Debian host: install Apptainer and SLURM yourself (containers/README.md)"
    exit 0
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt-get update -q >/dev/null
    # Package scripts must not start the daemons: the tests start and stop their own.
    own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        own_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    [[ $own_policy -eq 0 ]] || rm -f /usr/sbin/policy-rc.d
fi

if ! id "$BUILD_USER" >/dev/null 2>&1; then
    say "creating build user $BUILD_USER"
    useradd --system --create-home --home-dir "/var/lib/$BUILD_USER" --shell /bin/bash "$BUILD_USER"
fi
if ! grep -q "^$BUILD_USER:" /etc/subuid 2>/dev/null || ! grep -q "^$BUILD_USER:" /etc/subgid 2>/dev/null; then
    last=$((SUBID_START + SUBID_COUNT - 1))
    usermod --add-subuids "$SUBID_START-$last" --add-subgids "$SUBID_START-$last" "$BUILD_USER"
fi

containers/install-apptainer.sh >/dev/null
say "ready"

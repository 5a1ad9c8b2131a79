#!/usr/bin/env bash
# Install the Debian packages the tests need: a real single-node SLURM (slurm-wlm, slurmd, slurmctld,
# munge) for the launch tests, and the fonts the synthetic text renderer uses (DejaVu for Latin,
# WenQuanYi Micro Hei for Chinese; without it the Chinese samples are skipped with a warning). Idempotent: a quick no-op when they are already installed. Needs root (or sudo)
# and a reachable Debian mirror; when neither is there it says so and exits 0, and the SLURM tests
# skip with that reason printed (they never silently pass).
#
#   launch/ci_system_deps.sh          # from .ci/run or `make test`
set -uo pipefail

PACKAGES=(slurm-wlm slurmd slurmctld munge fonts-dejavu-core fonts-wqy-microhei)
FONTS=(/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf /usr/share/fonts/truetype/wqy/wqy-microhei.ttc)
BINARIES=(sbatch slurmctld slurmd munged scontrol)

have_all() {
    local b
    for b in "${BINARIES[@]}"; do command -v "$b" >/dev/null 2>&1 || return 1; done
    for f in "${FONTS[@]}"; do [ -e "$f" ] || return 1; done
    return 0
}

if have_all; then
    echo "ci_system_deps: SLURM and munge already installed ($(slurmctld -V 2>/dev/null))"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "ci_system_deps: not root and no passwordless sudo; cannot install ${PACKAGES[*]} (SLURM tests will skip)" >&2
        exit 0
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ci_system_deps: no apt-get on this machine; cannot install ${PACKAGES[*]} (SLURM tests will skip)" >&2
    exit 0
fi

echo "ci_system_deps: installing ${PACKAGES[*]} (about 30 s) ..."
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get update -qq; then
    echo "ci_system_deps: apt-get update failed (mirror unreachable?); SLURM tests will skip" >&2
    exit 0
fi
# policy-rc.d 101 stops the packages' postinst from starting system-wide daemons: the tests start
# their own, with their own config, under a temp dir.
POLICY=/usr/sbin/policy-rc.d
CREATED_POLICY=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null && $SUDO chmod +x "$POLICY" && CREATED_POLICY=1
fi
$SUDO apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
rc=$?
[ "$CREATED_POLICY" = 1 ] && $SUDO rm -f "$POLICY"
if [ $rc -ne 0 ] || ! have_all; then
    echo "ci_system_deps: apt-get install ${PACKAGES[*]} failed (rc=$rc); SLURM tests will skip" >&2
    exit 0
fi
echo "ci_system_deps: installed $(slurmctld -V 2>/dev/null)"

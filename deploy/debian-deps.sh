#!/usr/bin/env bash
# Install the Debian packages kmstn needs, only if some are missing (idempotent).
#   libtss2-dev + pkg-config: to build tpm2-pytss;  swtpm + swtpm-tools: the
#   emulated TPM used when no hardware TPM is present (labs, CI, the demo);
#   util-linux: setpriv, which ties swtpm's life to the keyvault's;
#   systemd: systemd-analyze, which the tests use to verify deploy/systemd units;
#   chromium + fonts-dejavu-core: the headless browser of the dashboard test.
#   openssl: s_server/s_client, the unmodified TLS 1.3 consumer of kmstn keys
#   in the tests (external PSK); libssl-dev: to build sslpsk3, the TLS-PSK
#   module of the SKIP client the tests use.
set -euo pipefail
packages=(libtss2-dev pkg-config swtpm swtpm-tools util-linux systemd chromium fonts-dejavu-core
          openssl libssl-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"

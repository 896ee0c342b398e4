#!/usr/bin/env bash
# Prints the path of the SoftHSM PKCS#11 module (it differs between distributions).
for candidate in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
                 /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so /usr/lib64/pkcs11/libsofthsm2.so \
                 /usr/local/lib/softhsm/libsofthsm2.so; do
  if [ -f "$candidate" ]; then echo "$candidate"; exit 0; fi
done
echo "libsofthsm2.so not found; run scripts/install-deps.sh" >&2
exit 1

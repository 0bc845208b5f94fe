#!/usr/bin/env bash
# Generate the TLS certificates and SuperNode authentication keys for a DDOME deployment.
#
#   deploy/make-certs.sh [OUT_DIR] [NUM_SUPERNODES]
#
#   OUT_DIR         where to write (default: deploy/certs next to this script)
#   NUM_SUPERNODES  how many SuperNode key pairs (default: 5, the compose file's SuperNodes)
#
# Environment:
#   EXTRA_SANS  more subjectAltNames for the SuperLink certificate, comma separated in
#               openssl syntax, e.g. "DNS:superlink.example.org,IP:10.0.0.5" (needed when
#               SuperNodes on other hosts reach the SuperLink by that name or address).
#   FORCE=1     overwrite existing files (by default an existing ca.crt stops the script).
#   DAYS        validity of the certificates (default 365).
#   PYTHON      interpreter used for the key pairs when ssh-keygen is missing (needs the
#               `cryptography` package, a dependency of flwr; default: python3).
#
# Writes:
#   OUT_DIR/ca.crt, ca.key              the certificate authority (keep ca.key offline)
#   OUT_DIR/server.pem, server.key      the SuperLink's certificate (SANs: superlink,
#                                       localhost, 127.0.0.1, ::1 and EXTRA_SANS)
#   OUT_DIR/keys/supernode-<i>[.pub]    EC P-384 key pair of the SuperNode with partition-id i
#                                       (OpenSSH format, as flower-supernode and
#                                       `flwr supernode register` expect), i = 0..N-1
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT_DIR="${1:-${SCRIPT_DIR}/certs}"
NUM_SUPERNODES="${2:-5}"
DAYS="${DAYS:-365}"
EXTRA_SANS="${EXTRA_SANS:-}"

if ! [[ "${NUM_SUPERNODES}" =~ ^[0-9]+$ ]]; then
  echo "NUM_SUPERNODES must be a non-negative integer, got '${NUM_SUPERNODES}'" >&2
  exit 2
fi
command -v openssl >/dev/null 2>&1 || { echo "openssl is required" >&2; exit 2; }

mkdir -p "${OUT_DIR}/keys"
if [[ -f "${OUT_DIR}/ca.crt" && "${FORCE:-0}" != "1" ]]; then
  echo "${OUT_DIR}/ca.crt exists; not overwriting (set FORCE=1 to regenerate)." >&2
  exit 1
fi
rm -f "${OUT_DIR}"/{ca.crt,ca.key,ca.srl,server.pem,server.key,server.csr} "${OUT_DIR}"/keys/supernode-*

SANS="DNS:superlink,DNS:localhost,IP:127.0.0.1,IP:::1"
if [[ -n "${EXTRA_SANS}" ]]; then
  SANS="${SANS},${EXTRA_SANS}"
fi

EXT_FILE="$(mktemp)"
trap 'rm -f "${EXT_FILE}"' EXIT
cat >"${EXT_FILE}" <<CONF
[req]
prompt = no
distinguished_name = dn
req_extensions = req_ext

[dn]
O = DDOME
CN = superlink

[req_ext]
subjectAltName = ${SANS}
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
CONF

# 1. Certificate authority.
openssl req -x509 -newkey rsa:4096 -sha256 -nodes -days "${DAYS}" \
  -keyout "${OUT_DIR}/ca.key" -out "${OUT_DIR}/ca.crt" \
  -subj "/O=DDOME/CN=DDOME deployment CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

# 2. SuperLink server key and certificate signed by the CA.
openssl req -new -newkey rsa:4096 -sha256 -nodes \
  -keyout "${OUT_DIR}/server.key" -out "${OUT_DIR}/server.csr" -config "${EXT_FILE}" 2>/dev/null
openssl x509 -req -in "${OUT_DIR}/server.csr" -sha256 -days "${DAYS}" \
  -CA "${OUT_DIR}/ca.crt" -CAkey "${OUT_DIR}/ca.key" -CAcreateserial \
  -extfile "${EXT_FILE}" -extensions req_ext -out "${OUT_DIR}/server.pem" 2>/dev/null
rm -f "${OUT_DIR}/server.csr" "${OUT_DIR}/ca.srl"

# 3. One EC (NIST P-384) key pair per SuperNode, in OpenSSH format.
gen_key() {
  local path="$1" name="$2"
  if command -v ssh-keygen >/dev/null 2>&1; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "${name}" -f "${path}"
  else
    "${PYTHON:-python3}" - "${path}" "${name}" <<'PY'
import os, sys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

path, name = sys.argv[1], sys.argv[2]
key = ec.generate_private_key(ec.SECP384R1())
private = key.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.OpenSSH,
    serialization.NoEncryption(),
)
public = key.public_key().public_bytes(
    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "wb") as handle:
    handle.write(private)
with open(path + ".pub", "wb") as handle:
    handle.write(public + b" " + name.encode() + b"\n")
PY
  fi
}
for ((i = 0; i < NUM_SUPERNODES; i++)); do
  gen_key "${OUT_DIR}/keys/supernode-${i}" "ddome-supernode-${i}"
done

chmod 600 "${OUT_DIR}/ca.key" "${OUT_DIR}/server.key"
chmod 644 "${OUT_DIR}/ca.crt" "${OUT_DIR}/server.pem"
echo "Wrote CA, SuperLink certificate (SANs: ${SANS}) and ${NUM_SUPERNODES} SuperNode key pairs to ${OUT_DIR}"

#!/usr/bin/env bash
# test/lib/make-test-ca.sh DIR: a throwaway certificate authority and a server certificate for
# localhost / 127.0.0.1 (for TLS tests), plus an unrelated CA that must not be trusted.
#   DIR/ca.pem ca.key server.pem server.key other-ca.pem
set -euo pipefail
d=${1:?usage: make-test-ca.sh DIR}
mkdir -p "$d"
cd "$d"
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj "/CN=sbpg test CA" 2>/dev/null
openssl req -x509 -newkey rsa:2048 -nodes -keyout other-ca.key -out other-ca.pem -days 2 -subj "/CN=other CA" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
cat > server.ext <<'X'
subjectAltName=DNS:localhost,IP:127.0.0.1
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
X
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 \
	-extfile server.ext 2>/dev/null
chmod 600 ./*.key

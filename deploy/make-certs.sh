#!/usr/bin/env bash
# Make a private CA, an fcl-server certificate and one client certificate per client id (mutual TLS).
#
#   deploy/make-certs.sh OUT_DIR SERVER_NAME[,MORE_NAMES] [CLIENT_ID ...]
#
# OUT_DIR gets ca.pem/ca.key, server.pem/server.key (SANs: localhost, 127.0.0.1 and every SERVER_NAME,
# DNS name or IP address) and CLIENT_ID.pem/CLIENT_ID.key (CN=CLIENT_ID) for each client id.
# Re-running is safe: the CA and every certificate that still chains to it are kept; the server
# certificate is re-issued only when the requested names change. Delete a file to re-issue it.
# Keys are EC P-256, mode 0600. Validity: CA_DAYS (default 3650) and DAYS (default 825).
set -euo pipefail

usage() {
    sed -n '2,10s/^# \{0,1\}//p' "$0" >&2
    exit 2
}
[[ $# -ge 2 ]] || usage
[[ $1 != -* ]] || usage
out=$1
server_names=$2
shift 2
days=${DAYS:-825}
ca_days=${CA_DAYS:-3650}
id_re='^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$'

command -v openssl >/dev/null || { echo "make-certs.sh: openssl is not installed" >&2; exit 1; }
for id in "$@"; do
    if [[ ! $id =~ $id_re ]] || [[ $id == ca || $id == server ]]; then
        echo "make-certs.sh: bad client id '$id' (1-128 of [A-Za-z0-9_.-], not 'ca' or 'server')" >&2
        exit 2
    fi
done

umask 077
mkdir -p "$out"
cd "$out"
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)

if [[ ! -s ca.pem || ! -s ca.key ]]; then
    openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.pem -days "$ca_days" -subj "/CN=fcl-ca" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        2>/dev/null
    chmod 0644 ca.pem
    echo "created CA $out/ca.pem"
fi

chains() {  # true when $1 exists and is signed by the current CA
    [[ -s $1 ]] && openssl verify -CAfile ca.pem "$1" >/dev/null 2>&1
}

issue() {  # issue NAME SUBJECT EXTENSIONS
    local name=$1 subject=$2 ext=$3
    printf '%s\n' "$ext" >"$name.ext"
    openssl req "${ec[@]}" -keyout "$name.key" -out "$name.csr" -subj "$subject" 2>/dev/null
    openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -set_serial "0x$(openssl rand -hex 16)" \
        -days "$days" -extfile "$name.ext" -out "$name.pem" 2>/dev/null
    rm -f "$name.csr"
    chmod 0644 "$name.pem" "$name.ext"
    chmod 0600 "$name.key"
    openssl verify -CAfile ca.pem "$name.pem" >/dev/null
    echo "issued $out/$name.pem ($subject)"
}

san="DNS:localhost,IP:127.0.0.1"
IFS=, read -r -a names <<<"$server_names"
for name in "${names[@]}"; do
    if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then
        san+=",IP:$name"
    elif [[ -n $name ]]; then
        san+=",DNS:$name"
    fi
done
server_ext="basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san"
if chains server.pem && [[ -s server.key && "$(cat server.ext 2>/dev/null)" == "$server_ext" ]]; then
    echo "kept $out/server.pem"
else
    issue server "/CN=${names[0]:-localhost}" "$server_ext"
fi

client_ext="basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
for id in "$@"; do
    if chains "$id.pem" && [[ -s $id.key ]]; then
        echo "kept $out/$id.pem"
    else
        issue "$id" "/CN=$id" "$client_ext"
    fi
done

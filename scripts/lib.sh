# Shared set-up steps for scripts/demo and scripts/test: idempotent, Debian/Ubuntu only.
# Each step does nothing when what it ensures is already there.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'omniroute setup: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root to run: $* (install sudo or run as root)"; fi
}

APT_UPDATED=0
ensure_packages() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install them by hand"
  say "installing Debian packages: ${missing[*]}"
  if [ "$APT_UPDATED" -eq 0 ]; then as_root apt-get update -qq; APT_UPDATED=1; fi
  # policy-rc.d may forbid starting services on install; we start what we need ourselves
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_port() {
  local host=$1 port=$2 what=$3 tries=${4:-60}
  for _ in $(seq "$tries"); do port_open "$host" "$port" && return 0; sleep 1; done
  die "$what did not start listening on $host:$port"
}

ensure_rabbitmq() {
  if port_open 127.0.0.1 5672; then return 0; fi
  ensure_packages rabbitmq-server
  say "starting RabbitMQ"
  as_root rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_port 127.0.0.1 5672 RabbitMQ 90
  as_root rabbitmqctl -q await_startup >/dev/null 2>&1 || true
}

# Prints the PostgreSQL DSN (without database) the tests should use.
ensure_postgres() {
  if port_open 127.0.0.1 5432 && psql_trust 5432; then echo "postgresql://postgres@127.0.0.1:5432"; return 0; fi
  ensure_packages postgresql
  local version; version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)
  [ -n "$version" ] || die "postgresql installed but no cluster version found in /etc/postgresql"
  if ! port_open 127.0.0.1 5432; then
    say "starting PostgreSQL $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start >/dev/null 2>&1 || true
    wait_port 127.0.0.1 5432 PostgreSQL 60
  fi
  if psql_trust 5432; then echo "postgresql://postgres@127.0.0.1:5432"; return 0; fi
  # The main cluster wants passwords: use a private test cluster with trust auth on loopback.
  if ! as_root pg_lsclusters -h | awk '{print $2}' | grep -qx omniroute-test; then
    say "creating a private PostgreSQL test cluster on 127.0.0.1:5439 (trust auth, loopback only)"
    as_root pg_createcluster "$version" omniroute-test -p 5439 -- --auth=trust >/dev/null \
      || die "pg_createcluster failed: cannot make a PostgreSQL test cluster"
    as_root sed -i "s/^#\?listen_addresses.*/listen_addresses = '127.0.0.1'/" "/etc/postgresql/$version/omniroute-test/postgresql.conf"
  fi
  port_open 127.0.0.1 5439 || as_root pg_ctlcluster --skip-systemctl-redirect "$version" omniroute-test start >/dev/null \
    || die "cannot start the PostgreSQL test cluster"
  wait_port 127.0.0.1 5439 "PostgreSQL test cluster" 60
  echo "postgresql://postgres@127.0.0.1:5439"
}

psql_trust() {
  command -v psql >/dev/null || return 1
  PGCONNECT_TIMEOUT=3 psql -w -h 127.0.0.1 -p "$1" -U postgres -d postgres -qtAc 'select 1' >/dev/null 2>&1
}

ensure_venv() {
  local extras=${1:-}
  command -v python3 >/dev/null || ensure_packages python3
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "omniroute needs Python 3.11 or newer (found $(python3 --version 2>&1))"
  # a venv made without ensurepip has python but no pip: check pip, and start over if missing
  if [ ! -x "$VENV/bin/pip" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV" 2>/dev/null || { rm -rf "$VENV"; ensure_packages python3-venv; python3 -m venv "$VENV"; }
  fi
  local stamp="$VENV/.installed$extras"
  if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    say "installing omniroute into $VENV"
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null
    "$VENV/bin/pip" install -q -e "$ROOT$extras"
    touch "$stamp"
  fi
}

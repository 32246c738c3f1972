#!/usr/bin/env bash
# Make sure the services fieldgate needs are installed and running on this machine.
#   scripts/services.sh             Mosquitto and Redis (for `make run`)
#   scripts/services.sh --test      Redis, and what the tests use: Mosquitto's binaries
#                                   (each test session runs brokers of its own),
#                                   PostgreSQL's server binaries, systemd-analyze, script
#                                   (for `make test`)
#   scripts/services.sh --packages  only install what is missing (before the venv)
# Installs from the distribution's packages (Debian/Ubuntu) when missing; needs root or sudo
# only then. A Redis already listening on its port is used as it is; for the broker,
# scripts/broker.sh decides and says which in one line.
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-run}"
want_pg=0
[ "$mode" = "--test" ] && want_pg=1

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

missing=()
command -v mosquitto >/dev/null || missing+=(mosquitto)
command -v mosquitto_pub >/dev/null || missing+=(mosquitto-clients)
command -v redis-server >/dev/null || missing+=(redis-server)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if [ "$want_pg" = 1 ]; then
  # The tests' own tools: a test missing one skips locally and fails in CI (CI=true).
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
  command -v systemd-analyze >/dev/null || missing+=(systemd)
  command -v script >/dev/null || missing+=(bsdutils)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "services: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ "$mode" = "--packages" ] && exit 0

# Which Mosquitto: the system's with fieldgate's settings, or one of fieldgate's own.
# Not for the tests: they start their own on free ports, and must not restart the
# system's or take the port of another checkout's.
[ "$mode" = "run" ] && scripts/broker.sh

if ! listening 6379; then
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    $SUDO systemctl start redis-server || true
  fi
  if ! listening 6379; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
      --dir /tmp --logfile /tmp/fieldgate-redis.log
  fi
  for _ in $(seq 50); do listening 6379 && break; sleep 0.1; done
  echo "services: redis started on 127.0.0.1:6379"
fi

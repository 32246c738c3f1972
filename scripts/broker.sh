#!/usr/bin/env bash
# The Mosquitto that `make run` uses, set up, and named in one line.
#
# fieldgate's session needs the broker to queue far more than Mosquitto's default of 1000
# QoS 1 messages while the daemon is away (past it Mosquitto drops them): the settings of
# config/mosquitto-fieldgate.conf. The system broker gets that file as a drop-in when its
# config reads an include_dir and its service can be restarted to read it (a reload does not
# do: Mosquitto 2.0 keeps its max_queued_messages across a SIGHUP). Otherwise fieldgate runs a
# Mosquitto of its own with that file on 127.0.0.1:18830 and writes var/broker.env, which
# every `fieldgate` command run from here with the default config reads, so the daemon,
# `simulate` and `admin` all reach it.
#
# `scripts/broker.sh stop` stops fieldgate's own broker (`make clean` does, before it
# removes var/); the system's is the system's.
#
# Where it looks and writes (a test points them at a layout of its own):
#   BROKER_SYSTEM_CONF   the system broker's config       [/etc/mosquitto/mosquitto.conf]
#   BROKER_SYSTEM_INIT   its service's init script         [/etc/init.d/mosquitto; else systemd]
#   BROKER_SYSTEM_PORT   where it listens                  [1883, config/fieldgate.toml's]
#   BROKER_OWN_PORT      where fieldgate's own listens     [18830]
#   BROKER_VAR           fieldgate's own files             [var]
set -euo pipefail
cd "$(dirname "$0")/.."

system_conf=${BROKER_SYSTEM_CONF:-/etc/mosquitto/mosquitto.conf}
system_init=${BROKER_SYSTEM_INIT:-/etc/init.d/mosquitto}
system_port=${BROKER_SYSTEM_PORT:-1883}
own_port=${BROKER_OWN_PORT:-18830}
var=${BROKER_VAR:-var}
settings=config/mosquitto-fieldgate.conf
env_file=$var/broker.env

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_listening() {
  for _ in $(seq 50); do listening "$1" && return 0; sleep 0.1; done
  return 1
}
# A pid file's process, if it is still a Mosquitto (not a pid reused since).
mosquitto_pid() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = mosquitto ] && echo "$pid"
}
# The first value of a directive of the system broker's config (Mosquitto reads
# include_dir only there, not in included files).
directive() { awk -v key="$1" '$1 == key { print $2; exit }' "$system_conf" 2>/dev/null || true; }
# The system broker's service: start, restart, status. Its init script (which hands over to
# systemctl where systemd runs), else systemd's unit; sudo unless the script is one's own.
system_service() {
  if [ -x "$system_init" ]; then
    if [ -O "$system_init" ]; then "$system_init" "$1"; else $SUDO "$system_init" "$1"; fi
  elif [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    $SUDO systemctl "$1" mosquitto
  else
    return 1
  fi
} >/dev/null 2>&1

use_system() {  # $1: what was done to it now, if anything
  rm -f "$env_file"
  echo "services: mosquitto: the system's on 127.0.0.1:$system_port, with $settings as" \
       "$dropin${1:+ ($1)}"
}

# Stop fieldgate's own broker if it runs: a clean stop, which saves its queue.
stop_own() {
  local pid
  pid=$(mosquitto_pid "$var/mosquitto/mosquitto.pid") || return 0
  kill "$pid"
  for _ in $(seq 100); do [ -d "/proc/$pid" ] || return 0; sleep 0.1; done
  echo "services: fieldgate's own Mosquitto ($pid) did not stop within 10 s" >&2
  exit 1
}

use_own() {  # $1: why not the system's
  local dir conf wanted
  mkdir -p "$var/mosquitto"
  dir=$(cd "$var/mosquitto" && pwd)
  conf=$dir/mosquitto.conf
  wanted=$(
    echo "# Written by scripts/broker.sh at each \`make run\`: fieldgate's own Mosquitto"
    echo "# (docs/broker.md). Its settings are $settings's, appended below."
    echo "listener $own_port 127.0.0.1"
    echo "allow_anonymous true"
    echo "persistence true"
    echo "persistence_location $dir/"
    echo "autosave_interval 10"
    echo "pid_file $dir/mosquitto.pid"
    echo "log_dest file $dir/mosquitto.log"
    echo "# Started as root, Mosquitto would become the mosquitto user, who cannot write here."
    echo "user $(id -un)"
    cat "$settings"
  )
  if [ "$wanted" != "$(cat "$conf" 2>/dev/null)" ]; then
    stop_own  # settings or port changed: the start below reloads the queue it saved
  fi
  printf '%s\n' "$wanted" >"$conf"
  if ! mosquitto_pid "$dir/mosquitto.pid" >/dev/null; then
    if listening "$own_port"; then
      echo "services: 127.0.0.1:$own_port, for fieldgate's own Mosquitto, is taken by another" \
           "program; free it or choose another port with BROKER_OWN_PORT=..." >&2
      exit 1
    fi
    # What it says before its log is open (a config it refuses) goes to its log too.
    mosquitto -d -c "$conf" >>"$dir/mosquitto.log" 2>&1
    if ! wait_listening "$own_port"; then
      echo "services: fieldgate's own Mosquitto did not start; see $dir/mosquitto.log" >&2
      exit 1
    fi
  fi
  printf '%s\n' \
    "# Written by scripts/broker.sh: where fieldgate's own Mosquitto listens. Every" \
    "# \`fieldgate\` command run from here with the default config reads it (the" \
    "# environment wins); docs/broker.md." \
    "FIELDGATE_MQTT__HOST=127.0.0.1" \
    "FIELDGATE_MQTT__PORT=$own_port" >"$env_file"
  echo "services: mosquitto: fieldgate's own on 127.0.0.1:$own_port ($1);" \
       "fieldgate commands here find it in $env_file; mosquitto_sub/pub: -p $own_port"
}

if [ "${1:-}" = stop ]; then
  stop_own
  exit 0
fi

include_dir=$(directive include_dir)
if [ -z "$include_dir" ] || [ ! -d "$include_dir" ]; then
  use_own "$system_conf has no include_dir for $settings"
  exit 0
fi
dropin=$include_dir/fieldgate.conf
installed=""
if ! cmp -s "$settings" "$dropin"; then
  if [ -w "$include_dir" ]; then cp "$settings" "$dropin"; else $SUDO cp "$settings" "$dropin"; fi
  installed="installed now"
fi

if system_service status; then
  if [ -n "$installed" ]; then
    if ! { system_service restart && wait_listening "$system_port"; }; then
      use_own "the system Mosquitto did not come back from a restart"
      exit 0
    fi
    installed="$installed, restarted"
  fi
  if listening "$system_port"; then
    use_system "$installed"
  else
    use_own "the system Mosquitto does not listen on 127.0.0.1:$system_port"
  fi
elif listening "$system_port"; then
  use_own "what listens on 127.0.0.1:$system_port is not the system Mosquitto"
elif system_service start && wait_listening "$system_port"; then
  use_system "${installed:+$installed, }started"
else
  use_own "the system Mosquitto could not be started"
fi

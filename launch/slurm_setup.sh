#!/usr/bin/env bash
# Install and start a real single-node Slurm on this machine (slurmctld + slurmd on localhost).
#
# For tests and for trying `longtrain launch ... launch.backend=slurm` on one box. Debian's
# slurm-wlm and munge come from apt-get; the config follows shared/notes/slurm-single-node.md:
# munge auth, proctrack/linuxproc, no cgroups, cons_tres with CR_Core, JobRequeue=1 and one
# partition with OverSubscribe=YES holding this host with all of its CPUs.
#
# Idempotent: when `sinfo` already answers and the written config is unchanged it returns in well
# under a second. With --if-possible it never fails (for CI): without root, apt-get or a package
# source it prints why and exits 0, and the Slurm tests skip themselves.
#
# Usage: bash launch/slurm_setup.sh [--if-possible] [--force-restart]
set -uo pipefail

IF_POSSIBLE=0
FORCE_RESTART=0
for arg in "$@"; do
  case "$arg" in
    --if-possible) IF_POSSIBLE=1 ;;
    --force-restart) FORCE_RESTART=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "slurm_setup: unknown argument $arg (use --if-possible, --force-restart)" >&2; exit 2 ;;
  esac
done

say() { echo "slurm_setup: $*"; }
give_up() {
  if [ "$IF_POSSIBLE" = 1 ]; then
    say "skipped: $* -- the Slurm tests will skip (this is fine with --if-possible)"
    exit 0
  fi
  say "error: $*" >&2
  exit 1
}

HOST=$(hostname -s)
NCPU=$(nproc)
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf

# The config we want, with this host's name and CPU count (both change between machines).
want_conf() {
  cat <<EOF
# Written by longtrain launch/slurm_setup.sh: a single-node Slurm for tests.
ClusterName=longtrain
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$HOST CPUs=$NCPU RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

slurm_answers() { timeout 5 sinfo -h -o '%T' 2>/dev/null | grep -qvE '^(down|drain|fail)'; }

# Fast path: already installed, configured for this host, and answering.
if [ "$FORCE_RESTART" = 0 ] && command -v sinfo >/dev/null 2>&1 && [ -f "$CONF" ] \
    && [ "$(cat "$CONF")" = "$(want_conf)" ] && slurm_answers; then
  say "Slurm already running on $HOST ($(sinfo -h -o '%P %D %T' | head -n1))"
  exit 0
fi

[ "$(id -u)" = 0 ] || give_up "needs root to install and start Slurm (run as root or with sudo)"

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
  command -v apt-get >/dev/null 2>&1 || give_up "apt-get not found; install slurm-wlm and munge by hand"
  say "installing slurm-wlm and munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q slurm-wlm munge >/tmp/slurm_setup_apt.log 2>&1; then
    # The package lists may be missing or stale on a fresh machine.
    timeout 300 apt-get update -q >>/tmp/slurm_setup_apt.log 2>&1
    apt-get install -y -q slurm-wlm munge >>/tmp/slurm_setup_apt.log 2>&1 \
      || give_up "apt-get install slurm-wlm munge failed (log: /tmp/slurm_setup_apt.log)"
  fi
fi

# --- munge: a key, its run directory, and the daemon running as user munge --------------------
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
if ! timeout 5 munge -n </dev/null 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged --force >/dev/null 2>&1 \
    || give_up "munged did not start (see /var/log/munge/munged.log)"
  for _ in $(seq 50); do
    timeout 5 munge -n </dev/null 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1 && break
    sleep 0.1
  done
fi

# --- Slurm: config, state directories, daemons ------------------------------------------------
mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
changed=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$(want_conf)" ]; then
  want_conf >"$CONF"
  : >"$CONF_DIR/cgroup.conf"
  changed=1
fi

stop_daemon() {  # by the pid file the daemon wrote, never by name
  local pidfile=$1
  if [ -f "$pidfile" ]; then
    local pid
    pid=$(cat "$pidfile")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
  fi
}
daemon_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [ "$changed" = 1 ] || [ "$FORCE_RESTART" = 1 ]; then
  stop_daemon /run/slurmd.pid
  stop_daemon /run/slurmctld.pid
fi
if ! daemon_alive /run/slurmctld.pid; then
  say "starting slurmctld on $HOST"
  slurmctld 2>>/var/log/slurm/slurmctld.log || give_up "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
fi
if ! daemon_alive /run/slurmd.pid; then
  say "starting slurmd on $HOST ($NCPU CPUs)"
  slurmd 2>>/var/log/slurm/slurmd.log || give_up "slurmd did not start (see /var/log/slurm/slurmd.log)"
fi

for _ in $(seq 100); do
  state=$(timeout 5 sinfo -h -n "$HOST" -o '%T' 2>/dev/null | head -n1)
  case "$state" in
    idle*|mixed*|alloc*|allocated*|completing*) say "Slurm is up: $(sinfo -h -o '%P %D %T %N' | head -n1)"; exit 0 ;;
    down*|drain*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 ;;
  esac
  sleep 0.2
done
give_up "Slurm did not report node $HOST ready within 20 s (state: ${state:-no answer}; logs in /var/log/slurm)"

#!/usr/bin/env bash
# Two or three "hosts" on one Linux machine: network namespaces joined by a bridge, each with its own
# address, hostname and /etc/hosts -- enough for Slurm and Ray to see separate nodes. Needs root.
#
#   bash launch/netns_hosts.sh up [N]        N hosts (default 2): ${PREFIX}1..N at ${SUBNET}.1..N/24
#   bash launch/netns_hosts.sh exec K CMD..  run CMD on host K (its network, its hostname)
#   bash launch/netns_hosts.sh slurm-up      slurmctld on host 1, one slurmd per host (own config, SLURM_CONF)
#   bash launch/netns_hosts.sh ray-up        `ray start --head` on host 1, `ray start --address` on the others
#   bash launch/netns_hosts.sh env           the SLURM_CONF / Ray address lines to export for `exec`
#   bash launch/netns_hosts.sh down          stop everything started in the hosts, remove them
#   bash launch/netns_hosts.sh check         exit 0 when this kernel lets us make namespaces, else say why
#
# Layout (nothing is added to the machine's own network namespace):
#   ${PREFIX}sw   a namespace holding the bridge br0 -- the "switch"
#   ${PREFIX}K    a host: veth eth0 (${SUBNET}.K/24) whose peer is a bridge port in ${PREFIX}sw
# `exec` enters a host's network namespace with /etc/netns/${PREFIX}K/hosts bound over /etc/hosts (every
# host resolves every other host's name to its test address) and a UTS namespace whose hostname is
# ${PREFIX}K, so processes there (slurmd, raylet and the workers they start) report their own host name.
# Daemons keep their state, logs and pid files under $STATE (/tmp/longtrain-netns-${PREFIX}).
#
# Environment: LT_NETNS_PREFIX (default ltnode), LT_NETNS_SUBNET (default 10.231.0, a private test
# range; the script only ever assigns addresses inside it to interfaces it created).
set -uo pipefail

PREFIX=${LT_NETNS_PREFIX:-ltnode}
SUBNET=${LT_NETNS_SUBNET:-10.231.0}
STATE=/tmp/longtrain-netns-$PREFIX
SW=${PREFIX}sw
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

say() { echo "netns_hosts: $*"; }
die() { echo "netns_hosts: error: $*" >&2; exit 1; }

hosts() {  # the host namespaces that exist now, in order
  ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}[0-9]+$" | sort -V
}
nhosts() { hosts | wc -l; }

check() {
  [ "$(id -u)" = 0 ] || { echo "needs root (ip netns add)"; return 1; }
  command -v ip >/dev/null || { echo "iproute2 (ip) is not installed"; return 1; }
  command -v unshare >/dev/null || { echo "unshare (util-linux) is not installed"; return 1; }
  local probe=${PREFIX}probe$$ err
  if ! err=$(ip netns add "$probe" 2>&1); then echo "the kernel refused a network namespace: $err"; return 1; fi
  if ! err=$(ip netns exec "$probe" unshare --uts --mount true 2>&1); then
    ip netns del "$probe"; echo "the kernel refused a UTS namespace: $err"; return 1
  fi
  ip netns del "$probe"
  return 0
}

up() {
  local n=${1:-2}
  [[ "$n" =~ ^[1-9]$ ]] || die "up N: N must be 1..9 (got $n)"
  local why
  why=$(check) || die "$why"
  [ -z "$(hosts)" ] || die "hosts ${PREFIX}* already exist; run: bash $0 down"
  mkdir -p "$STATE"
  ip netns add "$SW" || die "ip netns add $SW failed"
  ip -n "$SW" link add br0 type bridge && ip -n "$SW" link set br0 up && ip -n "$SW" link set lo up \
    || { down; die "could not create the bridge in $SW"; }
  local hosts_file="127.0.0.1 localhost"$'\n'
  for k in $(seq "$n"); do hosts_file+="$SUBNET.$k ${PREFIX}$k"$'\n'; done
  for k in $(seq "$n"); do
    local ns=${PREFIX}$k
    ip netns add "$ns" || { down; die "ip netns add $ns failed"; }
    # created inside the switch namespace, its peer moved straight into the host: never in ours
    ip -n "$SW" link add "p$k" type veth peer name eth0 netns "$ns" \
      && ip -n "$SW" link set "p$k" master br0 && ip -n "$SW" link set "p$k" up \
      && ip -n "$ns" addr add "$SUBNET.$k/24" dev eth0 && ip -n "$ns" link set eth0 up \
      && ip -n "$ns" link set lo up || { down; die "could not wire $ns to the bridge"; }
    mkdir -p "/etc/netns/$ns"
    printf '%s' "$hosts_file" >"/etc/netns/$ns/hosts"
    echo "$ns" >"/etc/netns/$ns/hostname"
  done
  # a TCP connection from the last host to the first proves the wiring (ping is not installed here)
  local py=${PYTHON:-python3}
  ip netns exec "${PREFIX}1" "$py" - "$SUBNET.1" <<'EOF' &
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 29999)); s.listen(1); s.settimeout(10); c, _ = s.accept(); c.sendall(b"ok"); c.close()
EOF
  local server=$!
  local got=""
  for _ in $(seq 50); do
    got=$(ip netns exec "${PREFIX}$n" "$py" -c "
import socket,sys
try:
    c = socket.create_connection(('${PREFIX}1', 29999), timeout=2); print(c.recv(2).decode())
except OSError: pass" 2>/dev/null)
    [ "$got" = ok ] && break
    sleep 0.1
  done
  wait "$server" 2>/dev/null
  [ "$got" = ok ] || { down; die "no TCP connection from ${PREFIX}$n to ${PREFIX}1 ($SUBNET.1)"; }
  say "up: $n hosts $(hosts | tr '\n' ' ')on bridge br0 in $SW, $SUBNET.1-$n/24 (TCP ${PREFIX}$n -> ${PREFIX}1 ok)"
}

host_exec() {  # host_exec K CMD...: CMD in host K's network namespace, with hostname ${PREFIX}K
  local k=$1; shift
  local ns=${PREFIX}$k
  ip netns list | awk '{print $1}' | grep -qx "$ns" || die "no host $ns (run: bash $0 up)"
  # nsenter, not `ip netns exec`: the latter remounts /sys, and slurmd needs the machine's cgroup mounts.
  # A private mount namespace carries this host's /etc/hosts; a UTS namespace its hostname.
  exec nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private \
    sh -c 'mount --bind "/etc/netns/$0/hosts" /etc/hosts && hostname "$0" && exec "$@"' "$ns" "$@"
}

# ------------------------------------------------------------------------------------------ Slurm
slurm_conf() {
  local ncpu; ncpu=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS
  cat <<EOF
# Written by longtrain launch/netns_hosts.sh: a Slurm cluster of network-namespace hosts.
ClusterName=$PREFIX
SlurmctldHost=${PREFIX}1($SUBNET.1)
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
StateSaveLocation=$STATE/slurm/ctld
SlurmdSpoolDir=$STATE/slurm/spool-%n
SlurmctldPidFile=$STATE/slurm/slurmctld.pid
SlurmdPidFile=$STATE/slurm/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurm/slurmctld.log
SlurmdLogFile=$STATE/slurm/slurmd-%n.log
SlurmctldTimeout=30
SlurmdTimeout=30
EOF
  for ns in $(hosts); do
    echo "NodeName=$ns NodeHostname=$ns NodeAddr=$SUBNET.${ns#"$PREFIX"} CPUs=$ncpu RealMemory=2000 State=UNKNOWN"
  done
  echo "PartitionName=hosts Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
}

munge_up() {  # the machine's munged (a unix socket, reachable from every network namespace)
  timeout 5 munge -n </dev/null 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1 && return 0
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key; chmod 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged --force >/dev/null 2>&1 || die "munged did not start"
  for _ in $(seq 50); do
    timeout 5 munge -n </dev/null 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "munge does not answer"
}

slurm_up() {
  [ -n "$(hosts)" ] || die "no hosts (run: bash $0 up 2)"
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    || die "Slurm is not installed (bash launch/slurm_setup.sh installs slurm-wlm and munge)"
  munge_up
  mkdir -p "$STATE/slurm/ctld"
  for ns in $(hosts); do mkdir -p "$STATE/slurm/spool-$ns"; done
  slurm_conf >"$STATE/slurm/slurm.conf"
  echo "# proctrack/linuxproc and task/none: no cgroup settings" >"$STATE/slurm/cgroup.conf"
  export SLURM_CONF=$STATE/slurm/slurm.conf
  ( host_exec 1 slurmctld -i ) || die "slurmctld did not start (log: $STATE/slurm/slurmctld.log)"
  for ns in $(hosts); do
    ( host_exec "${ns#"$PREFIX"}" slurmd -N "$ns" ) || die "slurmd on $ns did not start (log: $STATE/slurm/slurmd-$ns.log)"
  done
  local want; want=$(nhosts)
  for _ in $(seq 150); do
    local idle
    idle=$(ip netns exec "${PREFIX}1" timeout 5 sinfo -h -N -o '%N %T' 2>/dev/null | grep -cE ' (idle|mixed|allocated)')
    if [ "$idle" = "$want" ]; then
      say "Slurm up: $(ip netns exec "${PREFIX}1" sinfo -h -o '%P %D %T %N' | head -n1); SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 0.2
  done
  die "Slurm nodes not ready within 30 s: $(ip netns exec "${PREFIX}1" sinfo -h -N -o '%N %T' 2>&1 | tr '\n' ' ')(logs in $STATE/slurm)"
}

# -------------------------------------------------------------------------------------------- Ray
ray_start() {  # ray_start K ARGS..: `ray start ARGS` on host K, up to 3 tries
  # `ray start` gives a raylet 30 s (fixed in Ray) to register; on a loaded machine that can pass.
  # A failed try leaves processes behind in host K only: they are stopped by pid (`ray stop` would
  # stop every Ray process of the machine, other users' too) before the next try.
  local k=$1; shift
  local log=$STATE/ray/start-$k.log
  for try in 1 2 3; do
    ( host_exec "$k" "$ray" start "$@" --node-ip-address="$SUBNET.$k" --num-cpus="$ncpu" $ports \
        --disable-usage-stats --temp-dir="$STATE/ray/${PREFIX}$k" >"$log" 2>&1 ) && return 0
    say "ray start on ${PREFIX}$k failed (try $try of 3): $(tail -n 1 "$log")"
    local pids; pids=$(ip netns pids "${PREFIX}$k" | tr '\n' ' ')
    # shellcheck disable=SC2086
    [ -n "${pids// /}" ] && kill -KILL $pids 2>/dev/null
    sleep 1
    rm -rf "${STATE:?}/ray/${PREFIX}$k"
  done
  die "ray start on ${PREFIX}$k failed 3 times: $(tail -n 5 "$log")"
}

ray_up() {
  [ -n "$(hosts)" ] || die "no hosts (run: bash $0 up 2)"
  local ray=${RAY:-$(command -v ray)}
  [ -x "$ray" ] || die "ray is not installed (pip install 'ray[default]'); set RAY=/path/to/ray"
  local ncpu=${LT_RAY_CPUS:-2}
  mkdir -p "$STATE/ray"
  # --temp-dir per host keeps the sessions (sockets, logs) of the hosts apart. Token authentication
  # (on by default for `ray start --head` in the Ray installed here, 2.60) is off: this cluster listens only on the test
  # bridge, which nothing outside these namespaces reaches; a real cluster should keep it on.
  export RAY_AUTH_MODE=disabled
  # The raylet waits for its dashboard agent (a Python process) to start; on a loaded machine
  # that takes longer than the default allows, and the raylet aborts ("Timed out waiting for file").
  export RAY_agent_register_timeout_ms=${RAY_agent_register_timeout_ms:-300000}
  # fixed agent ports (each host has its own network, so they cannot collide): with port 0 the
  # raylet waits for the agents to write theirs to a file, which can time out on a loaded machine
  local ports="--dashboard-agent-grpc-port=52366 --dashboard-agent-listen-port=52365 --metrics-export-port=52368 --runtime-env-agent-port=52367"
  ray_start 1 --head --port=6379 --include-dashboard=false
  for ns in $(hosts | tail -n +2); do
    ray_start "${ns#"$PREFIX"}" --address="$SUBNET.1:6379"
  done
  say "Ray up: head $SUBNET.1:6379, $(nhosts) nodes x $ncpu CPUs; use launch.ray.address=$SUBNET.1:6379"
}

# ------------------------------------------------------------------------------------------- down
down() {
  local ns pids
  # every process still in a host (slurmctld, slurmd, raylet, workers): TERM, then KILL
  for sig in TERM KILL; do
    pids=""
    for ns in $(hosts) "$SW"; do
      ip netns list | awk '{print $1}' | grep -qx "$ns" || continue
      pids+=" $(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
    done
    pids=$(echo "$pids" | xargs -n1 2>/dev/null | sort -u | tr '\n' ' ')
    [ -n "${pids// /}" ] || break
    # shellcheck disable=SC2086
    kill -"$sig" $pids 2>/dev/null
    for _ in $(seq 30); do
      local left=0
      for p in $pids; do kill -0 "$p" 2>/dev/null && left=1; done
      [ "$left" = 0 ] && break
      sleep 0.1
    done
  done
  for ns in $(hosts) "$SW"; do
    ip netns list | awk '{print $1}' | grep -qx "$ns" || continue
    ip netns del "$ns"
    rm -rf "/etc/netns/$ns"
  done
  rm -rf "$STATE"
  say "down: no ${PREFIX}* namespaces left"
}

print_env() {
  echo "export SLURM_CONF=$STATE/slurm/slurm.conf"
  echo "# ray: launch.ray.address=$SUBNET.1:6379"
}

cmd=${1:-}
shift || true
case "$cmd" in
  up) up "$@" ;;
  exec)
    [ $# -ge 2 ] || die "exec K CMD..."
    # inside the hosts, Slurm commands talk to their cluster (not one SLURM_CONF names outside)
    [ -f "$STATE/slurm/slurm.conf" ] && export SLURM_CONF=$STATE/slurm/slurm.conf
    host_exec "$@" ;;
  slurm-up) slurm_up ;;
  ray-up) ray_up ;;
  down) down ;;
  env) print_env ;;
  check) check ;;
  state-dir) echo "$STATE" ;;
  *) sed -n '2,24p' "$0"; exit 2 ;;
esac

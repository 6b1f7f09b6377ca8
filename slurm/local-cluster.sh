#!/usr/bin/env bash
# A one-node Slurm cluster on localhost (munged + slurmctld + slurmd) for trying `hpcattn submit`
# and for the real-Slurm tests. Needs root and Debian's packages (`install` gets them). Everything
# it writes (slurm.conf, state, spool, logs, PID files, the munge socket) lives in one directory,
# $HPCATTN_SLURM_DIR (default /tmp/hpcattn-slurm); `stop` ends only the daemons whose PID files
# are there, after checking that each PID still runs that daemon with that directory's config.
#
#   slurm/local-cluster.sh install     # apt-get install slurmctld slurmd slurm-client munge
#   slurm/local-cluster.sh start       # start, wait until the node is idle, print SLURM_CONF
#                                      # (a port in use fails at once; a failed start stops
#                                      # again whatever it started)
#   eval "$(slurm/local-cluster.sh env)"   # point sbatch/squeue/scontrol at it
#   slurm/local-cluster.sh status | stop | clean
#
# Settings (environment): HPCATTN_SLURM_DIR, HPCATTN_SLURM_CPUS (CPUs the node declares, may
# exceed the cores; default 8), HPCATTN_SLURM_PORT (slurmctld port, slurmd uses +1; default 6817).
set -euo pipefail
PATH=$PATH:/usr/sbin:/usr/local/sbin   # the daemons live in sbin, which non-login shells may lack

DIR=${HPCATTN_SLURM_DIR:-/tmp/hpcattn-slurm}
CPUS=${HPCATTN_SLURM_CPUS:-8}
PORT=${HPCATTN_SLURM_PORT:-6817}
CONF=$DIR/slurm.conf
NODE=localnode
SOCKET=$DIR/munge/munge.socket
READY_TIMEOUT=${HPCATTN_SLURM_READY_TIMEOUT:-60}

die() { echo "local-cluster.sh: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "$1 needs root (the daemons run as root/munge); run it with sudo"; }

need_cmds() {
  local missing=()
  for c in munged slurmctld slurmd sinfo; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
  [ ${#missing[@]} = 0 ] || die "missing ${missing[*]}; run '$0 install' (Debian/Ubuntu, root)"
}

# pid of daemon $1 if its PID file is ours and the process runs that program with our files
our_pid() {
  local name=$1 pidfile=$2 pid
  [ -s "$pidfile" ] || return 1
  pid=$(cat "$pidfile")
  [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$name" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$DIR/" || return 1
  echo "$pid"
}

munged_pid()    { our_pid munged "$DIR/munge/munged.pid"; }
slurmctld_pid() { our_pid slurmctld "$DIR/slurmctld.pid"; }
slurmd_pid()    { our_pid slurmd "$DIR/slurmd.pid"; }

write_conf() {
  local host mem
  host=$(hostname -s)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
  mkdir -p "$DIR"/state "$DIR"/spool "$DIR"/log
  cat >"$CONF" <<EOF
# written by slurm/local-cluster.sh: one node on localhost, nothing listens beyond loopback
ClusterName=hpcattn-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
AuthInfo=socket=$SOCKET
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmi2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
ReturnToService=2
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmdParameters=config_overrides
SchedulerType=sched/builtin
MinJobAge=600
KillWait=10
InactiveLimit=0
NodeName=$NODE NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munged() {
  if munged_pid >/dev/null; then return; fi
  mkdir -p "$DIR/munge"
  chown munge: "$DIR/munge"
  chmod 0755 "$DIR/munge"   # clients (sbatch as any user) must reach the socket
  runuser -u munge -- munged --socket="$SOCKET" --pid-file="$DIR/munge/munged.pid" \
    --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" 9>&- \
    || die "munged did not start; see $DIR/munge/munged.log"
}

# true when something listens on TCP port $1 of this machine: ss when there is one, else a
# connection through bash's /dev/tcp (which only sees loopback, where our daemons listen)
port_busy() {
  local port=$1
  if command -v ss >/dev/null 2>&1; then
    [ -n "$(ss -Hltn "sport = :$port" 2>/dev/null)" ]
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
  fi
}

# fail before starting anything when a port a daemon of ours needs is taken by someone else
check_port() {
  local name=$1 port=$2 who=""
  "${name}_pid" >/dev/null && return 0   # ours, already running
  port_busy "$port" || return 0
  who=$(ss -Hltnp "sport = :$port" 2>/dev/null | grep -o 'users:(("[^"]*"' | head -n 1 | cut -d'"' -f2 || true)
  die "port $port ($name) is already in use${who:+ by $who}; stop that program or choose other ports with HPCATTN_SLURM_PORT=N (slurmd takes N+1)"
}

wait_idle() {
  local t=0 state
  while :; do
    state=$(SLURM_CONF=$CONF sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
    case $state in idle*|mix*|alloc*) return 0 ;; esac
    if [ "$t" -ge 3 ]; then   # the daemons have written their PID files by now
      slurmctld_pid >/dev/null || die "slurmctld exited during start; see $DIR/log/slurmctld.log"
      slurmd_pid >/dev/null || die "slurmd exited during start; see $DIR/log/slurmd.log"
    fi
    [ "$t" -lt "$READY_TIMEOUT" ] || die "node $NODE not idle after ${READY_TIMEOUT}s (state '${state:-?}'); see $DIR/log/"
    sleep 1; t=$((t + 1))
  done
}

STARTED=()   # daemons this start started, stopped again if the start fails
undo_failed_start() {
  local rc=$? i
  trap - EXIT
  set +e
  if [ "$rc" != 0 ]; then
    for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do stop_one "${STARTED[i]}" >&2; done
  fi
  exit "$rc"
}

cmd_start() {
  need_root start; need_cmds
  mkdir -p "$DIR"; chmod 0755 "$DIR"
  # two starts at once (parallel test sessions) take turns; the daemons must not inherit the lock
  exec 9>"$DIR/.start.lock"; flock 9
  check_port slurmctld "$PORT"
  check_port slurmd $((PORT + 1))
  trap undo_failed_start EXIT
  write_conf
  if ! munged_pid >/dev/null; then STARTED+=(munged); start_munged; fi
  if ! slurmctld_pid >/dev/null; then
    STARTED+=(slurmctld)
    slurmctld -f "$CONF" 9>&- || die "slurmctld did not start; see $DIR/log/slurmctld.log"
  fi
  if ! slurmd_pid >/dev/null; then
    STARTED+=(slurmd)
    slurmd -f "$CONF" -N "$NODE" 9>&- || die "slurmd did not start; see $DIR/log/slurmd.log"
  fi
  wait_idle
  trap - EXIT
  echo "local Slurm cluster up: node $NODE ($CPUS CPUs), config $CONF"
  echo "export SLURM_CONF=$CONF"
}

stop_one() {
  local name=$1 pid t=0
  pid=$("${name}_pid") || return 0
  kill -TERM "$pid"
  while kill -0 "$pid" 2>/dev/null; do
    [ "$t" -lt 30 ] || { echo "local-cluster.sh: $name ($pid) ignores SIGTERM; sending SIGKILL" >&2; kill -KILL "$pid"; }
    sleep 0.5; t=$((t + 1))
  done
  echo "stopped $name ($pid)"
}

cmd_stop() {
  stop_one slurmd; stop_one slurmctld; stop_one munged
}

cmd_status() {
  local n up=0
  for n in munged slurmctld slurmd; do
    if pid=$("${n}_pid"); then echo "$n: running (pid $pid)"; up=$((up + 1)); else echo "$n: not running"; fi
  done
  if [ "$up" = 3 ]; then
    SLURM_CONF=$CONF sinfo -N -o "%N %t %c" 2>&1 | sed 's/^/  /'
    echo "export SLURM_CONF=$CONF"
  fi
  [ "$up" = 3 ]
}

cmd_clean() {
  if munged_pid >/dev/null || slurmctld_pid >/dev/null || slurmd_pid >/dev/null; then
    die "daemons still running; '$0 stop' first"
  fi
  rm -rf "$DIR"
  echo "removed $DIR"
}

cmd_install() {
  need_root install
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge
}

case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  clean) cmd_clean ;;
  install) cmd_install ;;
  *) echo "usage: $0 install|start|stop|status|env|clean" >&2; exit 2 ;;
esac

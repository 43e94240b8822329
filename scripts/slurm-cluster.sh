#!/usr/bin/env bash
# A throwaway single-node Slurm cluster for tests and CI (Debian slurm-wlm + munge, run as root).
#
#   scripts/slurm-cluster.sh start [DIR]   write DIR/slurm.conf for this host, start munged, slurmctld, slurmd;
#                                          prints `export SLURM_CONF=DIR/slurm.conf` (clients need it)
#   scripts/slurm-cluster.sh stop [DIR]    stop the three daemons by their own pid files
#   scripts/slurm-cluster.sh status [DIR]  sinfo through this cluster's configuration
#
# DIR defaults to $BENCHSUITE_SLURM_DIR or /tmp/benchsuite-slurm. Nothing outside DIR is written except
# munge's own runtime folder (/run/munge) and, when absent, its key (/etc/munge/munge.key).
set -euo pipefail

action="${1:-}"
dir="${2:-${BENCHSUITE_SLURM_DIR:-/tmp/benchsuite-slurm}}"
conf="$dir/slurm.conf"

die() { echo "slurm-cluster: $*" >&2; exit 1; }

stop_pid() {  # stop_pid NAME PIDFILE: TERM the daemon named in its pid file, wait until it is gone
  local name="$1" file="$2" pid
  [[ -f "$file" ]] || return 0
  pid="$(cat "$file")"
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && echo "slurm-cluster: $name (pid $pid) did not stop" >&2
  fi
  rm -f "$file"
}

write_conf() {
  local host cpus mem
  host="$(hostname -s)"
  cpus="$(nproc)"
  mem="$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 9 / 10 ))"
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  cat > "$conf" <<EOF
# written by benchsuite scripts/slurm-cluster.sh: one node, no accounting, fast requeue and kill
ClusterName=benchsuite
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=5
MinJobAge=600
MaxArraySize=10001
SchedulerParameters=sched_interval=2
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start() {
  [[ "$(id -u)" == 0 ]] || die "needs root (starts munged as the munge user and slurmd as root)"
  for bin in munged slurmctld slurmd sinfo; do
    command -v "$bin" >/dev/null || die "$bin not found: apt-get install slurm-wlm munge"
  done
  write_conf
  if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge /etc/munge/munge.key
  chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  if ! { [[ -f /run/munge/munged.pid ]] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; }; then
    runuser -u munge -- munged --force
  fi
  stop_pid slurmd "$dir/slurmd.pid"
  stop_pid slurmctld "$dir/slurmctld.pid"
  slurmctld -f "$conf" -i
  slurmd -f "$conf"
  export SLURM_CONF="$conf"
  for _ in $(seq 100); do
    if sinfo -h -o %T 2>/dev/null | grep -q '^idle'; then
      echo "export SLURM_CONF=$conf"
      return 0
    fi
    sleep 0.2
  done
  die "the node did not become idle within 20 s; see $dir/log/"
}

case "$action" in
  start) start ;;
  stop)
    stop_pid slurmd "$dir/slurmd.pid"
    stop_pid slurmctld "$dir/slurmctld.pid"
    stop_pid munged /run/munge/munged.pid
    ;;
  status) SLURM_CONF="$conf" sinfo ;;
  *) die "usage: $0 start|stop|status [DIR]" ;;
esac

#!/bin/sh
# A one-node Slurm on this machine for ipmpi's tests and benchmarks: munge,
# slurmctld and slurmd, configuration and state outside /etc.
#
#   slurm/local-slurm.sh start    start it (idempotent); prints the SLURM_CONF line
#   slurm/local-slurm.sh stop     cancel every job, stop the daemons (idempotent)
#   slurm/local-slurm.sh status   exit 0 if it answers (sinfo), else 1
#   slurm/local-slurm.sh env      print `export SLURM_CONF=...`
#
# Needs root and Debian's slurmctld slurmd slurm-client munge (and
# slurm-wlm-torque for qsub/qstat/qdel over it). Everything lives under
# $IPMPI_SLURM_DIR (default /var/tmp/ipmpi-slurm): slurm.conf, spool and
# state directories, pid files, daemon logs. Clients (sbatch, squeue, qsub,
# ipcluster slurm|pbs) need SLURM_CONF=$IPMPI_SLURM_DIR/slurm.conf; the
# tests read that path when SLURM_CONF is not set.
#
# The node declares 128 CPUs whatever the machine has, so that jobs of up to
# 127 engines (128 ranks) are accepted; the ranks then share the real cores
# (ipmpi's engines idle without spinning). Partition "debug" is the default;
# a job may share the node with others (OverSubscribe=FORCE:4).
set -eu

DIR=${IPMPI_SLURM_DIR:-/var/tmp/ipmpi-slurm}
CONF=$DIR/slurm.conf
HOST=$(hostname)

say() { echo "local-slurm: $*"; }
die() { echo "local-slurm: error: $*" >&2; exit 1; }

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

answers() { SLURM_CONF=$CONF timeout 10 sinfo -h -o %T >/dev/null 2>&1; }

node_idle() {
    st=$(SLURM_CONF=$CONF timeout 10 sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
    case $st in idle*|mixed*|allocated*) return 0 ;; esac
    return 1
}

write_conf() {
    mkdir -p "$DIR/spool/slurmd" "$DIR/state" "$DIR/log" "$DIR/run"
    cat >"$CONF.tmp" <<EOF
# Written by ipmpi's slurm/local-slurm.sh: a one-node Slurm for tests.
ClusterName=ipmpi-local
SlurmctldHost=$HOST
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmdSpoolDir=$DIR/spool/slurmd
StateSaveLocation=$DIR/state
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmUser=root
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
MinJobAge=60
KillWait=5
NodeName=$HOST CPUs=128 Boards=1 SocketsPerBoard=1 CoresPerSocket=128 ThreadsPerCore=1 RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    mv "$CONF.tmp" "$CONF"
}

start_munge() {
    if [ -S /run/munge/munge.socket.2 ] && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    command -v munged >/dev/null || die "munged is missing: apt-get install munge"
    mkdir -p /run/munge
    key=/etc/munge/munge.key
    if [ ! -s "$key" ]; then
        # Debian's package makes this key; without it, one of our own.
        key=$DIR/munge.key
        [ -s "$key" ] || { dd if=/dev/urandom of="$key" bs=1024 count=1 2>/dev/null; chmod 400 "$key"; }
    fi
    munged --force --key-file="$key" --pid-file="$DIR/run/munged.pid" \
        --log-file="$DIR/log/munged.log" || die "munged did not start (see $DIR/log/munged.log)"
    i=0
    until munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; do
        i=$((i + 1)); [ $i -lt 50 ] || die "munge does not answer (see $DIR/log/munged.log)"
        sleep 0.1
    done
}

start() {
    [ "$(id -u)" = 0 ] || die "must run as root"
    for c in slurmctld slurmd sinfo; do
        command -v $c >/dev/null || die "$c is missing: apt-get install slurmctld slurmd slurm-client munge slurm-wlm-torque"
    done
    mkdir -p "$DIR"
    if pid_alive "$DIR/run/slurmctld.pid" && pid_alive "$DIR/run/slurmd.pid" && answers; then
        say "already running ($CONF)"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    write_conf
    start_munge
    export SLURM_CONF=$CONF
    pid_alive "$DIR/run/slurmctld.pid" || slurmctld -f "$CONF" || die "slurmctld did not start (see $DIR/log/slurmctld.log)"
    pid_alive "$DIR/run/slurmd.pid" || slurmd -f "$CONF" || die "slurmd did not start (see $DIR/log/slurmd.log)"
    i=0
    until node_idle; do
        i=$((i + 1))
        if [ $i -ge 150 ]; then
            tail -5 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
            die "the node did not become idle within 15 s"
        fi
        # A node left DOWN by an earlier run comes back with this.
        [ $((i % 20)) -eq 10 ] && scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
        sleep 0.1
    done
    say "running: node $HOST idle, partition debug ($CONF)"
    echo "export SLURM_CONF=$CONF"
}

stop() {
    export SLURM_CONF=$CONF
    if [ -f "$CONF" ] && answers; then
        scancel --full --quiet --partition=debug 2>/dev/null || true
        # Give cancelled jobs a moment to end before their daemons go.
        i=0
        while [ -n "$(squeue -h -o %i 2>/dev/null)" ] && [ $i -lt 100 ]; do i=$((i + 1)); sleep 0.1; done
    fi
    for d in slurmd slurmctld; do
        if pid_alive "$DIR/run/$d.pid"; then
            pid=$(cat "$DIR/run/$d.pid")
            kill "$pid" 2>/dev/null || true
            i=0
            while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do i=$((i + 1)); sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$DIR/run/$d.pid"
    done
    # munged only if we started it.
    if pid_alive "$DIR/run/munged.pid"; then
        kill "$(cat "$DIR/run/munged.pid")" 2>/dev/null || true
        rm -f "$DIR/run/munged.pid"
    fi
    say "stopped"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status)
        if [ -f "$CONF" ] && answers; then say "running ($CONF)"; exit 0; fi
        say "not running"; exit 1 ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac

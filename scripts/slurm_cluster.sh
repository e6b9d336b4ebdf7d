#!/usr/bin/env bash
# A two-node SLURM cluster on this machine, on loopback: munged, slurmctld and two slurmd
# daemons (node1, node2), everything under one folder.
#
#   scripts/slurm_cluster.sh start DIR   # installs Debian's packages if missing (root), starts, waits for idle
#   scripts/slurm_cluster.sh stop DIR    # stops exactly the daemons that start recorded in DIR/pids
#
# Clients use it with SLURM_CONF=DIR/slurm.conf. Exit status 3 from start: SLURM cannot be
# installed here (the reason is printed); the caller may skip.
set -euo pipefail

command=${1:?usage: slurm_cluster.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: slurm_cluster.sh start|stop DIR}")
packages="slurmctld slurmd slurm-client munge"

unavailable() { echo "SLURM unavailable: $*" >&2; exit 3; }

install() {
    local missing=""
    for tool in slurmctld slurmd sbatch munged; do
        command -v "$tool" >/dev/null || PATH="$PATH:/usr/sbin" command -v "$tool" >/dev/null || missing="$missing $tool"
    done
    [ -z "$missing" ] && return 0
    [ "$(id -u)" = 0 ] || unavailable "missing$missing and not root to install $packages"
    command -v apt-get >/dev/null || unavailable "missing$missing and no apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $packages >"$dir/apt.log" 2>&1 \
        || { apt-get update -q >>"$dir/apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -q --no-install-recommends $packages >>"$dir/apt.log" 2>&1; } \
        || unavailable "apt-get install $packages failed (see $dir/apt.log)"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start() {
    mkdir -p "$dir"/{munge,state,log,spool}
    chmod 700 "$dir" "$dir/munge"
    install
    export PATH="$PATH:/usr/sbin"
    [ "$(id -u)" = 0 ] || unavailable "the daemons run as root here (SlurmUser=root); run as root"

    # munge: our own key, socket and pid file, nothing of the system's.
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munge.seed"
    cat "$dir/munge/munged.pid" >"$dir/pids"

    # The emulated node names do not resolve: every task talks over loopback.
    printf '#!/bin/sh\necho export MASTER_ADDR=127.0.0.1\n' >"$dir/task_prolog.sh"
    chmod 755 "$dir/task_prolog.sh"
    local ctld_port node_port
    ctld_port=$(free_port)
    node_port=$(free_port)
    cat >"$dir/slurm.conf" <<CONF
ClusterName=draco
# Job ids differ from one cluster start to the next, so run directories named after them never collide.
FirstJobId=$((1000 + RANDOM * 30))
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
TaskProlog=$dir/task_prolog.sh
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
KillOnBadExit=1
ReturnToService=2
JobRequeue=1
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=node[1-2] NodeAddr=127.0.0.1 Port=$node_port-$((node_port + 1)) CPUs=4 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -D -c -f "$SLURM_CONF" >>"$dir/log/slurmctld.out" 2>&1 &
    echo $! >>"$dir/pids"
    for node in node1 node2; do
        slurmd -D -N "$node" -f "$SLURM_CONF" >>"$dir/log/slurmd-$node.out" 2>&1 &
        echo $! >>"$dir/pids"
    done
    for _ in $(seq 100); do
        if [ "$(sinfo -h -N -o '%T' 2>/dev/null | grep -c idle)" = 2 ]; then
            echo "SLURM up: SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 0.2
    done
    echo "SLURM did not come up; logs in $dir/log" >&2
    stop
    exit 1
}

stop() {
    [ -f "$dir/pids" ] || return 0
    export PATH="$PATH:/usr/sbin" SLURM_CONF="$dir/slurm.conf"
    # Cancel what still runs (a finished sweep's job may still be completing), and let it end.
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 100); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
    local pids
    pids=$(tac "$dir/pids")
    for pid in $pids; do kill "$pid" 2>/dev/null || true; done
    for _ in $(seq 50); do
        local alive=0
        for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    for pid in $pids; do kill -9 "$pid" 2>/dev/null || true; done
    # Job steps of this cluster (slurmstepd and the tasks it ran, which carry its SLURM_CONF and a
    # job id) must not outlive it; nothing else is touched.
    for proc in /proc/[0-9]*; do
        pid=${proc#/proc/}
        [ "$pid" = $$ ] && continue
        local environ
        # Grouped, so that 2>/dev/null also covers the input redirection: a kernel thread's or a process of
        # another user's environ opens but fails to read, and bash would print that for every such process.
        environ=$( { tr '\0' '\n' <"$proc/environ"; } 2>/dev/null) || continue
        grep -qx "SLURM_CONF=$dir/slurm.conf" <<<"$environ" || continue
        if grep -q "^SLURM_JOB_ID=" <<<"$environ" || [[ "$( { tr '\0' ' ' <"$proc/cmdline"; } 2>/dev/null)" == slurmstepd* ]]; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    rm -f "$dir/pids"
}

case "$command" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: slurm_cluster.sh start|stop DIR" >&2; exit 2 ;;
esac

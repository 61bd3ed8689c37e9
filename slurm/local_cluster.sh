#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for tests: two emulated nodes (node1, node2) on localhost,
# a default partition `debug` and a high-priority partition `urgent` that preempts it (jobs requeued).
#
#   slurm/local_cluster.sh start    install Debian's packages if missing, write the config, start munged,
#                                   slurmctld and two slurmd; waits until both nodes are idle (idempotent)
#   slurm/local_cluster.sh stop     cancel the jobs, stop the daemons this script started
#   slurm/local_cluster.sh status   print the daemons and `sinfo`; exit 1 when the cluster is not up
#
# Everything (config, state, spool, logs, munge socket) lives in $SFT_SLURM_DIR (default /tmp/sft-slurm).
# Needs root (apt-get, /etc/hosts, /etc/slurm/slurm.conf). Never run it on a machine that is a real
# Slurm node: it refuses to replace a slurm.conf it did not write.
set -euo pipefail

DIR=${SFT_SLURM_DIR:-/tmp/sft-slurm}
CONF=$DIR/slurm.conf
SYSTEM_CONF=/etc/slurm/slurm.conf
NODES=(node1 node2)
CPUS_PER_NODE=4
MEM_PER_NODE=4000
MARK="# sft local cluster"

log() { echo "local_cluster: $*" >&2; }
die() { log "$*"; exit 1; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    [ "$(id -u)" = 0 ] || die "Slurm is not installed and installing it needs root"
    log "installing slurmctld slurmd slurm-client munge (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
    mkdir -p "$DIR"/{state,spool,log,munge}
    chown munge:munge "$DIR/munge"
    chmod 755 "$DIR/munge"  # munged wants its socket folder readable by all
    local host
    host=$(hostname -s)
    {
        echo "$MARK: written by slurm/local_cluster.sh, do not edit"
        echo "ClusterName=sft-local"
        echo "SlurmctldHost=$host(127.0.0.1)"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        # cred_expire=10: a requeued job restarts in ~12 s instead of ~2 min.
        echo "AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10"
        echo "StateSaveLocation=$DIR/state"
        echo "SlurmdSpoolDir=$DIR/spool/%n"
        echo "SlurmctldPidFile=$DIR/slurmctld.pid"
        echo "SlurmdPidFile=$DIR/slurmd-%n.pid"
        echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
        echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "SwitchType=switch/none"
        echo "MpiDefault=none"
        echo "MailProg=/bin/true"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core"
        echo "AccountingStorageType=accounting_storage/none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "JobCompType=jobcomp/none"
        echo "ReturnToService=2"
        echo "SlurmdParameters=config_overrides"
        echo "SchedulerParameters=bf_interval=1,sched_interval=2"
        echo "KillWait=5"
        echo "MinJobAge=600"
        # Real preemption: jobs of a higher PriorityTier partition requeue those of a lower one.
        echo "PreemptType=preempt/partition_prio"
        echo "PreemptMode=REQUEUE"
        local port=17001
        for n in "${NODES[@]}"; do
            echo "NodeName=$n NodeHostname=$host NodeAddr=127.0.0.1 Port=$port CPUs=$CPUS_PER_NODE RealMemory=$MEM_PER_NODE State=UNKNOWN"
            port=$((port + 1))
        done
        local nodes
        nodes=$(IFS=,; echo "${NODES[*]}")
        echo "PartitionName=debug Nodes=$nodes Default=YES MaxTime=INFINITE State=UP PriorityTier=1"
        echo "PartitionName=urgent Nodes=$nodes MaxTime=INFINITE State=UP PriorityTier=10"
    } >"$CONF.tmp"
    mv "$CONF.tmp" "$CONF"

    # Clients (sbatch, sinfo, srun inside jobs, submitit) read /etc/slurm/slurm.conf: point it here,
    # but never over a config this script did not write.
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    if [ -e "$SYSTEM_CONF" ] && ! [ -L "$SYSTEM_CONF" ] && ! grep -q "^$MARK" "$SYSTEM_CONF"; then
        die "$SYSTEM_CONF exists and was not written by this script; refusing to replace a real cluster's config"
    fi
    ln -sfn "$CONF" "$SYSTEM_CONF"

    # Node names must resolve (torchrun's rendezvous host is the first node of the allocation).
    if ! grep -q "$MARK" /etc/hosts; then
        echo "127.0.0.1 ${NODES[*]} $MARK" >>/etc/hosts
    fi
}

start_daemons() {
    if ! alive "$DIR/munge/munged.pid"; then
        [ -f /etc/munge/munge.key ] || die "/etc/munge/munge.key is missing (reinstall munge)"
        runuser -u munge -- munged --socket="$DIR/munge/munge.socket" --pid-file="$DIR/munge/munged.pid" \
            --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" 9>&-
    fi
    if ! alive "$DIR/slurmctld.pid"; then
        # -c: start from a clean job state, so every start is the same cluster.
        slurmctld -c -i -f "$CONF" 9>&-  # 9>&-: daemons must not inherit the lock
    fi
    for n in "${NODES[@]}"; do
        if ! alive "$DIR/slurmd-$n.pid"; then
            mkdir -p "$DIR/spool/$n"
            slurmd -N "$n" -f "$CONF" 9>&-
        fi
    done
}

nodes_idle() {
    local states
    states=$(sinfo -h -N -p debug -o '%N %T' 2>/dev/null | sort -u) || return 1
    for n in "${NODES[@]}"; do
        grep -Eq "^$n (idle|mixed|allocated)" <<<"$states" || return 1
    done
}

cmd_start() {
    exec 9>"$DIR.lock"
    flock 9  # CI and a test fixture may start it at the same time
    if alive "$DIR/slurmctld.pid" && nodes_idle; then
        local n ok=1
        for n in "${NODES[@]}"; do alive "$DIR/slurmd-$n.pid" || ok=0; done
        if [ $ok = 1 ]; then log "already up ($DIR)"; return; fi
    fi
    install_packages
    write_config
    start_daemons
    local i
    for i in $(seq 1 120); do
        if nodes_idle; then
            log "up: $(sinfo -h -N -o '%N %P %T' | tr '\n' ' ')($DIR)"
            return
        fi
        sleep 0.5
    done
    sinfo -N >&2 || true
    die "nodes not idle after 60 s; see $DIR/log"
}

stop_pidfile() {
    local f=$1 pid i
    alive "$f" || { rm -f "$f"; return 0; }
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$f"; return 0; }
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
}

cmd_stop() {
    if alive "$DIR/slurmctld.pid"; then
        # Cancel the jobs first so their processes (slurmstepd, tasks) end with them.
        local jobs i
        jobs=$(squeue -h -o '%i' 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for i in $(seq 1 40); do
                [ -z "$(squeue -h -t running,completing -o '%i' 2>/dev/null)" ] && break
                sleep 0.5
            done
        fi
    fi
    local n
    for n in "${NODES[@]}"; do stop_pidfile "$DIR/slurmd-$n.pid"; done
    stop_pidfile "$DIR/slurmctld.pid"
    stop_pidfile "$DIR/munge/munged.pid"
    if [ -L "$SYSTEM_CONF" ] && [ "$(readlink "$SYSTEM_CONF")" = "$CONF" ]; then
        rm -f "$SYSTEM_CONF"
    fi
    log "stopped (state and logs kept in $DIR)"
}

cmd_status() {
    local up=1 n
    alive "$DIR/munge/munged.pid" && log "munged running" || { log "munged down"; up=0; }
    alive "$DIR/slurmctld.pid" && log "slurmctld running" || { log "slurmctld down"; up=0; }
    for n in "${NODES[@]}"; do
        alive "$DIR/slurmd-$n.pid" && log "slurmd $n running" || { log "slurmd $n down"; up=0; }
    done
    [ $up = 1 ] && sinfo && return 0
    return 1
}

case "${1:-}" in
    start) mkdir -p "$DIR"; cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac

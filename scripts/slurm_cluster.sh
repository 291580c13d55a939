#!/usr/bin/env bash
# slurm_cluster.sh: a real single-node SLURM cluster on one Debian 12 machine without systemd (a CI runner, a
# container, a VM), run as root. The SLURM tests (tests/test_slurm.py) and .ci/run start it; users can too, to try
# `hydra/launcher=slurm` before a real cluster. Daemons: munged, MariaDB + slurmdbd (accounting: `sacct`, which submitit polls
# to learn that a job ended without a result), slurmctld and slurmd, all started directly, no systemd.
#
#   slurm_cluster.sh [start]   install what is missing (apt-get), write the configs, start what is not running,
#                            wait until the node is idle, check srun and sacct. Safe to run again: running
#                            daemons are kept, a daemon whose config changed is restarted.
#   slurm_cluster.sh stop      stop exactly the daemons this script started (their PIDs are kept in $STARTED)
#   slurm_cluster.sh status    print each daemon's state, sinfo and squeue
#
# Two partitions: `debug` (the default) and `urgent`, whose jobs preempt debug's (PreemptType=preempt/partition_prio,
# PreemptMode=REQUEUE): a preempted job gets SIGTERM, GraceTime seconds later SIGKILL, and SLURM requeues it.
# Settings (environment): SLURM_PARTITION (debug), SLURM_DEFAULT_TIME (00:10:00), SLURM_MEM_RESERVE_MB (1024,
# kept back from RealMemory), SLURM_CLUSTER (ci), SLURM_KILL_WAIT (5 s between SIGTERM and SIGKILL when a job is
# cancelled or times out), SLURM_GRACE_TIME (10 s of preemption grace), SLURM_REQUEUE_HOLD (5 s: AuthInfo's
# cred_expire, which is also how long SLURM holds a requeued job before it may start again; 120 s by default),
# SLURM_NO_INSTALL=1 (never apt-get; fail if a package is missing).
# Logs: /var/log/slurm/{slurmctld,slurmd,slurmdbd}.log, /var/log/munge/munged.log, /var/log/mysql/mariadbd.log.
set -Eeuo pipefail

PARTITION=${SLURM_PARTITION:-debug}
DEFAULT_TIME=${SLURM_DEFAULT_TIME:-00:10:00}
MEM_RESERVE_MB=${SLURM_MEM_RESERVE_MB:-1024}
CLUSTER=${SLURM_CLUSTER:-ci}
KILL_WAIT=${SLURM_KILL_WAIT:-5}
GRACE_TIME=${SLURM_GRACE_TIME:-10}
REQUEUE_HOLD=${SLURM_REQUEUE_HOLD:-5}
STARTED=/run/slurm_cluster.started   # "name pid" of each daemon this script started
CONF_DIR=/etc/slurm
DB_PASS_FILE=/etc/slurm/.dbpass
START_LOG=/var/log/slurm_cluster.log
PKGS=(munge slurm-wlm slurmctld slurmd slurm-client slurmdbd mariadb-server)

say() { echo "slurm_cluster: $*"; }
die() { echo "slurm_cluster: ERROR: $*" >&2; exit 1; }
trap 'die "command failed (line $LINENO, status $?): $BASH_COMMAND"' ERR

# the daemons: name, pid file, log file
PID_munged=/run/munge/munged.pid;       LOG_munged=/var/log/munge/munged.log
PID_mariadbd=/run/mysqld/mysqld.pid;    LOG_mariadbd=/var/log/mysql/mariadbd.log
PID_slurmdbd=/run/slurmdbd.pid;         LOG_slurmdbd=/var/log/slurm/slurmdbd.log
PID_slurmctld=/run/slurmctld.pid;       LOG_slurmctld=/var/log/slurm/slurmctld.log
PID_slurmd=/run/slurmd.pid;             LOG_slurmd=/var/log/slurm/slurmd.log

pidfile() { local v="PID_$1"; echo "${!v}"; }
logfile() { local v="LOG_$1"; echo "${!v}"; }

# the PID of daemon $1 if it is running (its pid file names a live process with that name), else nothing
daemon_pid() {
    local f pid
    f=$(pidfile "$1")
    [[ -s $f ]] || return 0
    pid=$(tr -dc 0-9 < "$f")
    [[ -n $pid && -d /proc/$pid ]] || return 0
    local comm; comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    [[ $comm == "$1" || $comm == "$1-wlm" ]] && echo "$pid"   # Debian's slurmctld/slurmd are *-wlm binaries
    return 0
}

# wait_for SECONDS WHAT COMMAND...: retry COMMAND every second; fail naming WHAT and the daemon log to read
wait_for() {
    local secs=$1 what=$2 out=""; shift 2
    for ((i = 0; i < secs; i++)); do
        if out=$("$@" 2>&1); then return 0; fi
        sleep 1
    done
    die "$what did not come up within ${secs}s; last output: $(echo "$out" | tail -n 3)"
}

tail_log() { local f; f=$(logfile "$1"); [[ -f $f ]] && { echo "--- last lines of $f:" >&2; tail -n 15 "$f" >&2; }; return 0; }

# stop_daemon NAME [PID]: stop the daemon (the given PID only if it is still that daemon)
stop_daemon() {
    local name=$1 pid
    pid=$(daemon_pid "$name")
    [[ -z $pid ]] && return 0
    [[ -n ${2:-} && $2 != "$pid" ]] && return 0
    say "stopping $name (pid $pid)"
    kill "$pid"
    for ((i = 0; i < 30; i++)); do [[ -d /proc/$pid ]] || break; sleep 1; done
    if [[ -d /proc/$pid ]]; then say "$name (pid $pid) ignored SIGTERM for 30 s; sending SIGKILL"; kill -9 "$pid"; fi
    rm -f "$(pidfile "$name")"
}

# start_daemon NAME CHANGED COMMAND...: start unless running; restart when its config CHANGED (1)
start_daemon() {
    local name=$1 changed=$2; shift 2
    local pid; pid=$(daemon_pid "$name")
    if [[ -n $pid && $changed == 1 ]]; then say "$name: config changed, restarting"; stop_daemon "$name"; pid=""; fi
    if [[ -n $pid ]]; then say "$name already running (pid $pid)"; return 0; fi
    say "starting $name"
    # what the command prints goes to START_LOG (a daemon's own log must be created by the daemon: munged
    # refuses a log file that its user does not own)
    if ! "$@" >>"$START_LOG" 2>&1; then tail_log "$name"; tail -n 5 "$START_LOG" >&2; die "$name failed to start: $*"; fi
    for ((i = 0; i < 20; i++)); do pid=$(daemon_pid "$name"); [[ -n $pid ]] && break; sleep 0.5; done
    if [[ -z $pid ]]; then tail_log "$name"; die "$name did not write $(pidfile "$name") (see $(logfile "$name"))"; fi
    say "$name running (pid $pid)"
    echo "$name $pid" >>"$STARTED"
}

# install_file DEST MODE OWNER < content: replace DEST only when the content differs; prints 1 if it changed
install_file() {
    local dest=$1 mode=$2 owner=$3 tmp
    tmp=$(mktemp); cat >"$tmp"
    if [[ -f $dest ]] && cmp -s "$tmp" "$dest"; then rm -f "$tmp"; chmod "$mode" "$dest"; chown "$owner" "$dest"; echo 0; return; fi
    install -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" "$tmp" "$dest"; rm -f "$tmp"; echo 1
}

do_stop() {
    [[ -s $STARTED ]] || { say "nothing to stop: this script started no daemon ($STARTED is empty)"; return 0; }
    local name pid
    for d in slurmd slurmctld slurmdbd mariadbd munged; do
        while read -r name pid; do [[ $name == "$d" ]] && stop_daemon "$d" "$pid"; done <"$STARTED"
    done
    rm -f "$STARTED"
    say "stopped"
}

do_status() {
    for d in munged mariadbd slurmdbd slurmctld slurmd; do
        pid=$(daemon_pid "$d")
        if [[ -n $pid ]]; then printf '%-10s running (pid %s)\n' "$d" "$pid"; else printf '%-10s not running\n' "$d"; fi
    done
    command -v sinfo >/dev/null && { sinfo || true; squeue || true; }
}

do_start() {
    [[ $(id -u) == 0 ]] || die "run as root (it writes /etc/slurm and starts system daemons)"

    # 1. packages
    local missing=()
    for p in "${PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
    if ((${#missing[@]})); then
        [[ ${SLURM_NO_INSTALL:-0} == 1 ]] && die "missing packages: ${missing[*]} (SLURM_NO_INSTALL=1)"
        say "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null || die "apt-get update failed"
        apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
    fi

    # 2. the node as slurmd sees it
    local node cpus boards sockets cores threads mem_total mem
    node=$(hostname -s)
    getent hosts "$node" >/dev/null || die "hostname $node does not resolve; add '127.0.0.1 $node' to /etc/hosts"
    read -r cpus boards sockets cores threads < <(slurmd -C | awk -F'[ =]' '/^NodeName/ {
        for (i = 1; i < NF; i++) v[$i] = $(i + 1); print v["CPUs"], v["Boards"], v["SocketsPerBoard"], v["CoresPerSocket"], v["ThreadsPerCore"] }')
    [[ -n ${cpus:-} ]] || die "slurmd -C did not report the node's CPUs"
    mem_total=$(free -m | awk '/^Mem:/ {print $2}')
    mem=$((mem_total - MEM_RESERVE_MB))
    ((mem > 0)) || die "RealMemory would be $mem MB (total $mem_total, reserve $MEM_RESERVE_MB)"

    mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/log/munge \
             /var/lib/munge /run/mysqld /var/log/mysql
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    [[ -f $LOG_munged ]] && chown munge:munge "$LOG_munged"
    chmod 0755 /run/munge
    chown mysql:mysql /run/mysqld /var/log/mysql

    # 3. munge
    if [[ ! -s /etc/munge/munge.key ]]; then say "creating /etc/munge/munge.key"; mungekey --create --keyfile=/etc/munge/munge.key; fi
    chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
    start_daemon munged 0 runuser -u munge -- /usr/sbin/munged --log-file="$LOG_munged" --pid-file="$PID_munged"
    wait_for 10 "munge (munge -n | unmunge)" bash -c 'munge -n | unmunge'

    # 4. MariaDB and slurmdbd
    [[ -d /var/lib/mysql/mysql ]] || { say "initialising MariaDB"; mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null; }
    if [[ -z $(daemon_pid mariadbd) ]]; then
        say "starting mariadbd"
        # mariadbd does not daemonise itself; setsid detaches it from this shell
        setsid /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
            --pid-file="$PID_mariadbd" --log-error="$LOG_mariadbd" --bind-address=127.0.0.1 \
            --innodb-buffer-pool-size=64M \
            >>"$START_LOG" 2>&1 </dev/null &
        for ((i = 0; i < 60; i++)); do mariadb-admin --socket=/run/mysqld/mysqld.sock ping >/dev/null 2>&1 && break; sleep 1; done
        mariadb-admin --socket=/run/mysqld/mysqld.sock ping >/dev/null 2>&1 || { tail_log mariadbd; die "mariadbd did not answer within 60s"; }
        say "mariadbd running (pid $(daemon_pid mariadbd))"
        echo "mariadbd $(daemon_pid mariadbd)" >>"$STARTED"
    else
        say "mariadbd already running (pid $(daemon_pid mariadbd))"
    fi
    [[ -s $DB_PASS_FILE ]] || { umask 077; head -c 18 /dev/urandom | base64 | tr -dc A-Za-z0-9 >"$DB_PASS_FILE"; }
    local dbpass; dbpass=$(cat "$DB_PASS_FILE")
    mariadb --socket=/run/mysqld/mysqld.sock -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$dbpass';
        ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$dbpass';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;" \
        || die "could not create the MariaDB user for slurmdbd"

    # 5. slurm.conf (sacctmgr needs it too)
    local conf_changed
    conf_changed=$(install_file "$CONF_DIR/slurm.conf" 0644 root:root <<EOF
# written by slurm_cluster.sh: one node, this host
ClusterName=$CLUSTER
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$PID_slurmctld
SlurmdPidFile=$PID_slurmd
SlurmctldLogFile=$LOG_slurmctld
SlurmdLogFile=$LOG_slurmd
SlurmctldPort=6817
SlurmdPort=6818
# no cgroups in a sandbox: processes are tracked through /proc, tasks are not confined
ProctrackType=proctrack/linuxproc
# a requeued job may start again REQUEUE_HOLD s after it was requeued (the default credential lifetime, 120 s, is
# also that hold)
AuthInfo=cred_expire=$REQUEUE_HOLD
# debug's jobs are preempted by urgent's: SIGTERM, then SIGKILL after GraceTime, then requeued
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
SchedulerType=sched/backfill
# a small test cluster: look at pending jobs (a requeued one after its hold) every 2 s, not every 60
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# KillWait: seconds from SIGTERM to SIGKILL when a job is cancelled or reaches its time limit
KillWait=$KILL_WAIT
MinJobAge=300
JobRequeue=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus Boards=$boards SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES DefaultTime=$DEFAULT_TIME MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=$GRACE_TIME
PartitionName=urgent Nodes=$node Default=NO DefaultTime=$DEFAULT_TIME MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
)
    local dbd_changed
    dbd_changed=$(install_file "$CONF_DIR/slurmdbd.conf" 0600 root:root <<EOF
# written by slurm_cluster.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$LOG_slurmdbd
PidFile=$PID_slurmdbd
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$dbpass
StorageLoc=slurm_acct_db
EOF
)
    start_daemon slurmdbd "$dbd_changed" /usr/sbin/slurmdbd
    wait_for 60 "slurmdbd (sacctmgr show cluster)" sacctmgr -n show cluster
    if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
        say "registering cluster $CLUSTER in the accounting database"
        sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
    fi

    # 6. slurmctld, slurmd
    start_daemon slurmctld "$conf_changed" /usr/sbin/slurmctld
    start_daemon slurmd "$conf_changed" /usr/sbin/slurmd
    wait_for 30 "slurmctld (scontrol ping)" bash -c 'scontrol ping | grep -q UP'

    # 7. the node idle
    local state=""
    for ((i = 0; i < 60; i++)); do
        state=$(sinfo -h -n "$node" -o %T 2>/dev/null | head -1)
        case $state in
            idle|mixed|allocated|completing) break ;;
            down*|drain*|fail*) scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    case $state in idle|mixed|allocated|completing) ;; *)
        tail_log slurmctld; tail_log slurmd
        die "node $node is '${state:-unknown}', not idle, after 60s: scontrol show node $node | grep Reason" ;;
    esac
    say "node $node is $state (CPUs=$cpus RealMemory=${mem}MB, partition $PARTITION)"

    # 8. smoke test: srun, and sacct sees the job
    local out
    out=$(timeout 120 srun -p "$PARTITION" -N1 -n1 -t 1 -J slurm_cluster_check hostname 2>&1) \
        || die "srun hostname failed: $out"
    [[ $out == "$node"* ]] || die "srun hostname printed '$out', expected $node"
    # accounting reaches slurmdbd a moment after the job ends; submitit learns from sacct that a job is over
    wait_for 30 "sacct (the check job in the accounting database)" \
        bash -c 'sacct -n -X -S now-10minutes --name=slurm_cluster_check -o State | grep -q COMPLETED'
    say "ready: srun hostname -> $out; sinfo:"
    sinfo
}

case ${1:-start} in
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
    *) die "usage: $0 [start|stop|status]" ;;
esac

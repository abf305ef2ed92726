#!/usr/bin/env bash
# A real one-node SLURM 22.05 cluster on loopback for rlarith's tests: munge, MariaDB + slurmdbd (accounting,
# so sacct and submitit see real job states), slurmctld and slurmd, with partition-priority preemption
# (`low` is requeued by `high`). Debian packages, no systemd; every file it writes lives in one folder.
#
#   slurm/testcluster.sh start    install what is missing (root, apt-get), start what is not running, wait idle
#   slurm/testcluster.sh stop     cancel every job, stop the daemons (state and job ids are kept)
#   slurm/testcluster.sh status   one line per daemon and the node; exit 0 only when everything is up
#   slurm/testcluster.sh env      the `export` lines clients need:  eval "$(slurm/testcluster.sh env)"
#   slurm/testcluster.sh purge    stop, then delete the folder (job ids start again at 1)
#
# Folder: $RLARITH_SLURM_DIR (default /tmp/rlarith-slurm). Ports on 127.0.0.1 from $RLARITH_SLURM_PORT
# (default 6817: slurmctld 6817, slurmd 6818, slurmdbd 6819, MariaDB 6826). Why each setting: slurm/README.md.
set -euo pipefail

DIR=${RLARITH_SLURM_DIR:-/tmp/rlarith-slurm}
# Ports on 127.0.0.1: slurmctld PORT, slurmd PORT+1, slurmdbd PORT+2, MariaDB PORT+9. Another folder with
# another port is a second, independent cluster.
CTLD_PORT=${RLARITH_SLURM_PORT:-6817}
SLURMD_PORT=$((CTLD_PORT + 1))
DBD_PORT=$((CTLD_PORT + 2))
DB_PORT=$((CTLD_PORT + 9))
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
WAIT_S=${RLARITH_SLURM_WAIT_S:-60} # per daemon; the first MariaDB/slurmdbd start creates tables
NODE=$(hostname -s)
CONF=$DIR/etc/slurm.conf
DBDCONF=$DIR/etc/slurmdbd.conf
MUNGE_SOCKET=$DIR/munge/munged.sock
DB_SOCKET=$DIR/mysql/mysqld.sock
export SLURM_CONF=$CONF # every client and slurmdbd (which has no -f) read it

say() { echo "testcluster: $*"; }
die() {
	echo "testcluster: error: $*" >&2
	exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# Daemons, in start order: name, pid file, log file. comm (/proc/PID/comm) must equal the name, so a pid
# file left by a killed session that now points at another process is not taken for a live daemon.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
pidfile() { echo "$DIR/run/$1.pid"; }
logfile() { echo "$DIR/log/$1.log"; }

pid_of() {
	local pid
	pid=$(cat "$(pidfile "$1")" 2>/dev/null) || return 1
	[[ $pid =~ ^[0-9]+$ && -r /proc/$pid/comm && $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]] || return 1
	echo "$pid"
}
alive() { pid_of "$1" >/dev/null; }

fail_daemon() { # name, why
	local log
	log=$(logfile "$1")
	echo "testcluster: error: $1 $2. Last lines of $log:" >&2
	tail -n 25 "$log" 2>/dev/null | sed 's/^/    /' >&2 || echo "    (no log)" >&2
	exit 1
}

wait_for() { # name, description, command...
	local name=$1 what=$2 deadline=$((SECONDS + WAIT_S))
	shift 2
	until "$@" >/dev/null 2>&1; do
		alive "$name" || spawned_alive || fail_daemon "$name" "exited before it was $what"
		((SECONDS < deadline)) || fail_daemon "$name" "was not $what within ${WAIT_S} s"
		sleep 0.2
	done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
need_port() { # daemon, port: a daemon of ours is not running, so whoever answers there is someone else
	! port_open "$2" || die "$1 cannot start: port $2 on 127.0.0.1 is taken by another process (another cluster? \
choose other ports with RLARITH_SLURM_PORT=N, which uses N..N+2 and N+9)."
}

need_root() {
	[[ $(id -u) == 0 ]] || die "$1 needs root (SlurmUser=root, apt-get); run as root, or ask root to run '$0 start'."
}

install_packages() {
	local missing=() p
	for p in "${PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed' || missing+=("$p")
	done
	((${#missing[@]})) || return 0
	need_root "installing ${missing[*]}"
	command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them (Debian 12 has them)."
	local t0 log=/tmp/rlarith-slurm-apt.log
	t0=$(now)
	say "installing ${missing[*]} (apt-get, log $log)"
	export DEBIAN_FRONTEND=noninteractive
	# Package lists may be missing or stale on a fresh machine: update once and retry.
	if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
		apt-get update -q >>"$log" 2>&1 || true
		apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$log" 2>&1 ||
			{ tail -n 15 "$log" >&2; die "apt-get install ${missing[*]} failed (log above, full log $log)."; }
	fi
	say "installed in $(since "$t0") s"
}

mem_mb() { awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo; }

write_if_changed() { # path, mode; content on stdin. Returns 0 when the file changed.
	local tmp
	tmp=$(mktemp "$1.XXXXXX")
	cat >"$tmp"
	chmod "$2" "$tmp"
	if [[ -f $1 ]] && cmp -s "$tmp" "$1"; then
		rm -f "$tmp"
		return 1
	fi
	mv -f "$tmp" "$1"
}

write_configs() {
	# Sets SLURM_CONF_CHANGED / DBD_CONF_CHANGED: running daemons read their config only when they start.
	local cpus mem
	cpus=$(nproc)
	mem=${RLARITH_SLURM_MEM_MB:-$(mem_mb)}
	SLURM_CONF_CHANGED=0
	DBD_CONF_CHANGED=0
	write_if_changed "$CONF" 644 <<EOF && SLURM_CONF_CHANGED=1
# Written by slurm/testcluster.sh; edits are overwritten at the next start.
ClusterName=rlarith
SlurmctldHost=$NODE(127.0.0.1)
# Bind to what the hostname resolves to (127.x), never to every address.
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
SlurmUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
# cred_expire=10: a requeued job is eligible again after ~11 s instead of ~121 s.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$(logfile slurmctld)
SlurmdLogFile=$(logfile slurmd)
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups here (no systemd, a sandboxed kernel): plain process tracking.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Look at pending jobs every 2 s, not every 30-60 s: a requeued job starts soon after it is eligible.
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
# A node line that differs from the detected hardware never drains the node.
SlurmdParameters=config_overrides
JobRequeue=1
KillWait=10
# Preemption by partition priority: a job in high that needs the node requeues the one in low.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# Preemption sends the job's --signal first (not SIGTERM); under SchedulerParameters it is ignored.
SlurmctldParameters=preempt_send_user_signal
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# With a munge socket of its own, slurmctld finds it for slurmdbd through this key.
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=low Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=1 PreemptMode=REQUEUE GraceTime=15
PartitionName=high Nodes=$NODE MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=10 PreemptMode=OFF
EOF
	# slurmdbd has no -f: it reads slurmdbd.conf next to \$SLURM_CONF, and only when it is mode 600.
	write_if_changed "$DBDCONF" 600 <<EOF && DBD_CONF_CHANGED=1
# Written by slurm/testcluster.sh; edits are overwritten at the next start.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=$NODE
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
CommunicationParameters=NoInAddrAny
SlurmUser=root
PidFile=$(pidfile slurmdbd)
LogFile=$(logfile slurmdbd)
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StorageLoc=slurm_acct_db
EOF
	return 0
}

# A daemon is started detached (setsid, stdio to its log): a pytest that started the cluster must not
# wait on the daemons' pipes, and a Ctrl-C in its terminal must not reach them. fd 9 is the start lock.
spawn() { # log, command...
	local log=$1
	shift
	setsid "$@" </dev/null >>"$log" 2>&1 9>&- &
	SPAWNED=$!
}
# The spawned process is still there (mariadbd writes its pid file only once it is up).
spawned_alive() { [[ -r /proc/$SPAWNED/stat && $(cut -d' ' -f3 "/proc/$SPAWNED/stat") != Z ]]; }

start_munged() {
	alive munged && return 0
	if [[ ! -f $DIR/munge/munge.key ]]; then
		dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
		chmod 600 "$DIR/munge/munge.key"
	fi
	rm -f "$(pidfile munged)"
	# --force: run as root and take over a socket left by a killed munged.
	spawn "$(logfile munged)" munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
		--pid-file="$(pidfile munged)" --log-file="$(logfile munged)" --seed-file="$DIR/munge/munged.seed"
	local deadline=$((SECONDS + WAIT_S))
	until alive munged && munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; do
		((SECONDS < deadline)) || fail_daemon munged "did not answer on $MUNGE_SOCKET within ${WAIT_S} s"
		sleep 0.1
	done
	STARTED+=(munged)
}

db_sql() { mariadb --no-defaults -S "$DB_SOCKET" -u root -e "$1"; }

start_mariadb() {
	alive mariadbd && return 0
	if [[ ! -d $DIR/mysql/data/mysql ]]; then
		rm -rf "$DIR/mysql/data"
		mariadb-install-db --no-defaults --datadir="$DIR/mysql/data" --user=root --skip-test-db \
			--auth-root-authentication-method=normal >>"$(logfile mariadbd)" 2>&1 ||
			fail_daemon mariadbd "could not initialise $DIR/mysql/data (mariadb-install-db)"
	fi
	rm -f "$(pidfile mariadbd)"
	need_port mariadbd "$DB_PORT"
	# innodb_lock_wait_timeout and the buffer pool: what slurmdbd asks for (it logs an error otherwise); the
	# pool is reserved, not touched, so 1G costs little memory.
	spawn "$(logfile mariadbd)" mariadbd --no-defaults --user=root --datadir="$DIR/mysql/data" \
		--socket="$DB_SOCKET" --pid-file="$(pidfile mariadbd)" --log-error="$(logfile mariadbd)" \
		--port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve --skip-log-bin \
		--innodb-buffer-pool-size=1G --innodb-lock-wait-timeout=900 --innodb-flush-log-at-trx-commit=2
	wait_for mariadbd "accepting connections" mariadb-admin --no-defaults -S "$DB_SOCKET" -u root ping
	chmod 644 "$(pidfile mariadbd)" # mode 660 by default: other users' `start` and `status` read it
	# Every start, not only the first: a first start killed here would leave a database without the user.
	db_sql "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" ||
		fail_daemon mariadbd "refused to create the slurm user"
	STARTED+=(mariadbd)
}

start_slurm_daemon() { # name, readiness description, readiness command...
	local name=$1
	shift
	alive "$name" && return 0
	rm -f "$(pidfile "$name")"
	case $name in
	slurmdbd) need_port "$name" "$DBD_PORT" ;;
	slurmctld) need_port "$name" "$CTLD_PORT" ;;
	slurmd) need_port "$name" "$SLURMD_PORT" ;;
	esac
	case $name in
	slurmdbd) spawn "$(logfile "$name")" slurmdbd ;;
	slurmctld) spawn "$(logfile "$name")" slurmctld -f "$CONF" ;;
	slurmd) spawn "$(logfile "$name")" slurmd -f "$CONF" -N "$NODE" ;;
	esac
	# The daemons fork; the pid file appears once they are up.
	local deadline=$((SECONDS + WAIT_S))
	until alive "$name"; do
		((SECONDS < deadline)) || fail_daemon "$name" "did not write its pid file within ${WAIT_S} s"
		sleep 0.1
	done
	wait_for "$name" "$@"
	STARTED+=("$name")
}

cluster_registered() { sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx rlarith; }
ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n1; }
node_usable() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }

wait_node() {
	local deadline=$((SECONDS + WAIT_S)) state resumed=0
	until node_usable; do
		state=$(node_state)
		# A node drained by an earlier session (say, a job killed with the daemons) is given back.
		if [[ $state =~ drain|down ]] && ((!resumed)) && alive slurmd; then
			scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
			resumed=1
		fi
		alive slurmd || fail_daemon slurmd "exited before node $NODE was up"
		((SECONDS < deadline)) || fail_daemon slurmd "left node $NODE '${state:-unknown}' for ${WAIT_S} s"
		sleep 0.2
	done
}

stop_daemon() { # name
	local pid i
	pid=$(pid_of "$1") || {
		rm -f "$(pidfile "$1")"
		return 0
	}
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < 100; i++)); do
		[[ -d /proc/$pid ]] || break
		sleep 0.1
	done
	if [[ -d /proc/$pid ]]; then
		kill -KILL "$pid" 2>/dev/null || true
		say "$1 (pid $pid) ignored SIGTERM for 10 s: killed"
	fi
	rm -f "$(pidfile "$1")"
	STOPPED+=("$1")
}

# Two test sessions starting at once: the second waits, then finds the cluster up.
lock() {
	mkdir -p "$DIR"
	{ exec 9>>"$DIR/.lock"; } 2>/dev/null || exec 9<"$DIR/.lock"
	flock 9
}

all_up() {
	local d
	for d in "${DAEMONS[@]}"; do alive "$d" || return 1; done
	node_usable
}

cmd_start() {
	local t0
	t0=$(now)
	lock
	# Fast path: everything running with the config this script writes (only root can rewrite it).
	if all_up; then
		[[ $(id -u) == 0 ]] && write_configs
		if [[ $(id -u) != 0 ]] || ((!SLURM_CONF_CHANGED && !DBD_CONF_CHANGED)); then
			say "already running ($(node_state), $NODE, SLURM_CONF=$CONF)"
			return 0
		fi
	fi
	install_packages
	need_root "starting the cluster"
	mkdir -p "$DIR"/{etc,munge,mysql,state,spool,run,log}
	chown 0:0 "$DIR" # a test session of another user may have made it (for its lock file)
	# Clients of other users reach the munge socket only through o+x folders.
	chmod 755 "$DIR" "$DIR/munge" "$DIR/etc"
	chmod 700 "$DIR/mysql"
	[[ -n ${SLURM_CONF_CHANGED:-} ]] || write_configs
	# The daemons bind to what the hostname resolves to (NoInAddrAny): loopback keeps them off the network.
	getent hosts "$NODE" | grep -q '^127\.' ||
		say "warning: $NODE does not resolve to 127.x (add '127.0.0.1 $NODE' to /etc/hosts); the daemons may listen beyond loopback"
	STARTED=()
	STOPPED=()
	# A changed config reaches running daemons only through a restart.
	if ((DBD_CONF_CHANGED)) && alive slurmdbd; then stop_daemon slurmdbd; fi
	if ((SLURM_CONF_CHANGED)); then
		alive slurmd && stop_daemon slurmd
		alive slurmctld && stop_daemon slurmctld
	fi
	((${#STOPPED[@]} == 0)) || say "config changed: restarting ${STOPPED[*]}"
	start_munged
	start_mariadb
	start_slurm_daemon slurmdbd "listening on 127.0.0.1:$DBD_PORT" port_open "$DBD_PORT"
	start_slurm_daemon slurmctld "answering (scontrol ping)" ctld_up
	# slurmd is ready when its node is (a probe of its port would only put errors in its log).
	start_slurm_daemon slurmd "running" true
	wait_node
	# slurmctld adds the cluster to the accounting database when it first registers.
	wait_for slurmdbd "holding cluster 'rlarith' (sacctmgr list cluster)" cluster_registered
	if ((${#STARTED[@]})); then say "started ${STARTED[*]} (logs in $DIR/log)"; fi
	say "up in $(since "$t0") s: node $NODE $(node_state), CPUs=$(nproc); partitions low (PriorityTier=1, requeued after GraceTime=15 s) and high (PriorityTier=10)"
	say "clients: eval \"\$($0 env)\"   (SLURM_CONF=$CONF)"
}

cmd_stop() {
	lock
	STOPPED=()
	# Jobs would outlive slurmd (slurmstepd keeps them running): cancel them while slurmctld is there.
	if alive slurmctld && ctld_up; then
		local jobs i
		jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
		if [[ -n ${jobs// /} ]]; then
			# shellcheck disable=SC2086
			scancel $jobs 2>/dev/null || true
			for ((i = 0; i < 150; i++)); do
				[[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
				sleep 0.2
			done
			say "cancelled jobs $jobs"
		fi
	fi
	local i
	for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_daemon "${DAEMONS[i]}"; done
	if ((${#STOPPED[@]})); then say "stopped ${STOPPED[*]} (state kept in $DIR)"; else say "not running"; fi
}

cmd_status() {
	local d pid ok=0
	for d in "${DAEMONS[@]}"; do
		if pid=$(pid_of "$d"); then echo "$d: running (pid $pid)"; else
			echo "$d: not running"
			ok=1
		fi
	done
	if alive slurmctld && node_usable; then
		echo "node $NODE: $(node_state)"
		sinfo -o '%P %a %l %D %T %c %m' 2>/dev/null | sed 's/^/  /'
	else
		echo "node $NODE: $(alive slurmctld && node_state || echo 'no controller')"
		ok=1
	fi
	echo "SLURM_CONF=$CONF"
	return $ok
}

cmd_env() {
	echo "export SLURM_CONF=$CONF"
	echo "export RLARITH_SLURM_DIR=$DIR"
	echo "export RLARITH_SLURM_PORT=$CTLD_PORT"
}

cmd_purge() {
	cmd_stop
	[[ $DIR == /* && $DIR != / ]] || die "refusing to delete '$DIR'"
	rm -rf "$DIR"
	say "deleted $DIR"
}

case ${1:-} in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
env) cmd_env ;;
purge) cmd_purge ;;
*)
	echo "usage: $0 start|stop|status|env|purge   (folder: $DIR, from RLARITH_SLURM_DIR)" >&2
	exit 2
	;;
esac

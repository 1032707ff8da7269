#!/usr/bin/env bash
# Remit's one entry point, for developers and CI. `./run.sh help` lists the commands.
#
# Every command (but help) first prepares .venv and exports the configuration defaults
# (see README.md). `up`, `test` and `migrate` then make sure PostgreSQL (and, for up and
# test, Redis) answer: with DATABASE_URL / REDIS_URL unset and nothing listening on the
# default port, a throwaway server is started from the installed binaries in .run/ and
# stopped again when this script exits. The single-service commands (web, worker, beat,
# flower: one per docker compose service) just exec their process, servers untouched.
#
# Overrides:
#   REMIT_USE_SYSTEM_PYTHON=1  use python3, gunicorn and celery from PATH, no .venv (the
#                              Docker image installs its dependencies system-wide)
#   REMIT_PG_PORT     for testing this script: port checked, and used for a throwaway
#                     PostgreSQL, when DATABASE_URL is unset (default 5432)
#   REMIT_REDIS_PORT  the same for Redis when REDIS_URL is unset (default 6379)
#
# Exit status: 0 when the command succeeded (for up: stopped on request, every process
# cleanly); pytest's own status for test (5, no tests collected, counts as a failure);
# 2 for a usage error; 130 / 143 when interrupted (SIGINT / SIGTERM) while still preparing;
# 1 for anything else (a process of up died on its own or had to be killed, a server could
# not be started, migrations failed...).

#: up             run the whole stack in the foreground (the default): migrate, then web, worker, beat, Flower
#: test [ARGS]    run the test suite: pytest ARGS (each run creates and drops its own database)
#: migrate        create the database if missing, apply the migrations and seed it, then exit
#: web            run only the API (gunicorn) in the foreground, as its docker compose service does
#: worker         run only a settlement worker (Celery) in the foreground
#: beat           run only the scheduler (Celery beat) in the foreground
#: flower         run only Flower in the foreground, behind FLOWER_BASIC_AUTH (Flower's FLOWER_* variables apply)
#: bench [--quick]  benchmark the real stack on its own throwaway servers (bench/README.md; --help)
#: docker ARGS   the stack under Docker Compose: docker compose up --build ARGS (needs a Docker engine and .env)
#: cli ARGS       the operator CLI (python -m worker.cli): deposit, requeue, audit, sweep, stats, ...
#: audit          check every ledger invariant of the database; exit 1 on any violation
#: help           list these commands

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$PWD
VENV=$ROOT/.venv
RUN=$ROOT/.run                    # everything this script creates at run time (git-ignored)
PG_DIR=$RUN/pg                    # throwaway PostgreSQL: data/, sock/, server.log
PG_DATA=$PG_DIR/data
REDIS_DIR=$RUN/redis
REDIS_PIDFILE=$RUN/redis.pid

STARTED_PG=""                     # set when this script started the server, so it stops it
STARTED_REDIS=""
BIN=""                            # where python3, gunicorn and celery are: .venv/bin/ or PATH
PG_BIN=""                         # folder holding initdb and pg_ctl
PG_OS_USER=""                     # unprivileged user running PostgreSQL when we are root

APP_NAMES=()                      # the processes of `up`, in start order ...
APP_PIDS=()                       # ... and their real PIDs (each leads its own process group)
STOP_SIGNAL=""                    # set by the traps of `up`: a stop was requested
HURRY=""                          # a second Ctrl-C while stopping: kill at once
CHILD_PID=""                      # the child that run_child waits for ...
CHILD_SIGNAL=""                   # ... and a signal we got meanwhile

say() { printf 'remit: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

usage() {
    echo "usage: ./run.sh [command] [args]"
    sed -n 's/^#: /  /p' "$ROOT/$(basename "${BASH_SOURCE[0]}")"
    echo "configuration: environment variables, see README.md"
}

# --- signals and cleanup ------------------------------------------------------------------

# Outside the phases that wait for children themselves, a signal just ends the script;
# the EXIT trap then stops whatever it started.
default_traps() {
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
}

on_exit() {
    local rc=$?
    set +e
    # Stopping can take up to 30 s (the worker's warm shutdown): a second Ctrl-C cuts it short.
    trap 'HURRY=1' INT TERM HUP
    if ! stop_apps && ((rc == 0)); then # one had to be killed
        rc=1
    fi
    stop_servers
    exit "$rc"
}

# Runs "$@" as a child and waits for it; used instead of exec so that the EXIT trap still
# stops the throwaway servers afterwards. Ctrl-C reaches the child straight from the
# terminal (same process group); a SIGTERM or SIGHUP sent to this script is passed on as
# SIGINT, which Python programs, and pytest with its teardown (dropping its test
# database), handle as a clean stop. Returns the child's exit status.
run_child() {
    # A background child of a script starts with SIGINT ignored (POSIX); restore it so
    # that Ctrl-C works. The explicit <&0 keeps stdin (pytest --pdb) instead of /dev/null.
    (
        trap - INT QUIT
        exec "$@"
    ) <&0 &
    CHILD_PID=$!
    CHILD_SIGNAL=""
    trap 'CHILD_SIGNAL=INT' INT
    trap 'CHILD_SIGNAL=TERM; kill -INT "$CHILD_PID" 2>/dev/null' TERM
    trap 'CHILD_SIGNAL=HUP; kill -INT "$CHILD_PID" 2>/dev/null' HUP
    local rc
    while :; do
        rc=0
        wait "$CHILD_PID" || rc=$?
        # Above 128 with the child still there: a trapped signal interrupted wait.
        if ((rc > 128)) && kill -0 "$CHILD_PID" 2>/dev/null; then
            continue
        fi
        break
    done
    CHILD_PID=""
    default_traps
    return "$rc"
}

# --- Python environment -------------------------------------------------------------------

file_sha256() {
    "$VENV/bin/python" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"
}

# Creates .venv once, and reinstalls requirements.txt only when it changed since the last
# successful install (its sha256 is kept in a stamp file inside .venv).
ensure_venv() {
    if [[ ${REMIT_USE_SYSTEM_PYTHON:-} == 1 ]]; then
        BIN=""
        return 0
    fi
    BIN=$VENV/bin/
    if [[ ! -x $VENV/bin/python ]]; then
        command -v python3 >/dev/null ||
            die "python3 was not found: install Python 3.11 or newer (apt-get install python3 python3-venv)"
        say "creating .venv"
        python3 -m venv "$VENV" ||
            die "python3 -m venv failed: install the venv module (apt-get install python3-venv)"
    fi
    local stamp=$VENV/.requirements.sha256 want have=""
    want=$(file_sha256 requirements.txt)
    [[ -f $stamp ]] && have=$(<"$stamp")
    if [[ $want != "$have" ]]; then
        say "installing requirements.txt into .venv"
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt ||
            die "pip install -r requirements.txt failed (see above)"
        echo "$want" >"$stamp"
    fi
}

# --- configuration ------------------------------------------------------------------------

export_defaults() {
    REMIT_PG_PORT=${REMIT_PG_PORT:-5432}
    REMIT_REDIS_PORT=${REMIT_REDIS_PORT:-6379}
    # Only a URL we chose ourselves may be served by a throwaway server: an explicit
    # DATABASE_URL / REDIS_URL is the user's, and is used as it is.
    DATABASE_URL_IS_DEFAULT=""
    if [[ -z ${DATABASE_URL:-} ]]; then
        DATABASE_URL_IS_DEFAULT=1
        DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:$REMIT_PG_PORT/remit"
    fi
    REDIS_URL_IS_DEFAULT=""
    if [[ -z ${REDIS_URL:-} ]]; then
        REDIS_URL_IS_DEFAULT=1
        REDIS_URL="redis://127.0.0.1:$REMIT_REDIS_PORT/0"
    fi
    local cores
    cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)
    export DATABASE_URL REDIS_URL
    export REMIT_ENV=${REMIT_ENV:-development}
    export PORT=${PORT:-8000}
    export FLOWER_PORT=${FLOWER_PORT:-5555}
    export WEB_CONCURRENCY=${WEB_CONCURRENCY:-$cores}
    export WORKER_CONCURRENCY=${WORKER_CONCURRENCY:-$cores}
}

# --- servers ------------------------------------------------------------------------------

# port_open HOST PORT: does something accept TCP connections there? bash's own /dev/tcp,
# so that no extra tool (nc, ss, pg_isready, redis-cli) is needed.
port_open() {
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# wait_for_port HOST PORT SECONDS
wait_for_port() {
    local deadline=$((SECONDS + $3))
    until port_open "$1" "$2"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# PostgreSQL refuses to run as root: as root, run its commands as an unprivileged user.
# From / so that the server never depends on the caller's working directory.
as_pg_user() {
    if [[ -z $PG_OS_USER ]]; then
        (cd / && "$@")
    elif command -v runuser >/dev/null; then
        (cd / && runuser -u "$PG_OS_USER" -- "$@")
    else
        (cd / && su -s "$BASH" "$PG_OS_USER" -c "$(printf '%q ' "$@")")
    fi
}

# Finds initdb and pg_ctl: the version that created .run/pg if there is one, else the
# newest under /usr/lib/postgresql (Debian keeps them off PATH), else PATH.
find_pg_bin() {
    local dir want=""
    [[ -f $PG_DATA/PG_VERSION ]] && want=$(<"$PG_DATA/PG_VERSION")
    if [[ -n $want && -x /usr/lib/postgresql/$want/bin/pg_ctl ]]; then
        PG_BIN=/usr/lib/postgresql/$want/bin
        return 0
    fi
    while read -r dir; do
        if [[ -x $dir/initdb && -x $dir/pg_ctl ]]; then
            PG_BIN=$dir
            return 0
        fi
    done < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -rV)
    if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
        PG_BIN=$(dirname "$(command -v pg_ctl)")
        return 0
    fi
    return 1
}

ensure_postgres() {
    [[ -n $DATABASE_URL_IS_DEFAULT ]] || return 0
    port_open 127.0.0.1 "$REMIT_PG_PORT" && return 0
    find_pg_bin || die "PostgreSQL is not running on 127.0.0.1:$REMIT_PG_PORT and no initdb/pg_ctl was found:" \
        "install postgresql (apt-get install postgresql) or set DATABASE_URL, or use docker compose"
    start_postgres
}

start_postgres() {
    if ((EUID == 0)); then
        PG_OS_USER=nobody
        id -u postgres >/dev/null 2>&1 && PG_OS_USER=postgres
    fi
    mkdir -p "$PG_DIR/sock"
    [[ -z $PG_OS_USER ]] || chown "$PG_OS_USER" "$PG_DIR" "$PG_DIR/sock"
    as_pg_user test -w "$PG_DIR" ||
        die "user $PG_OS_USER cannot write $PG_DIR (a parent folder closed to other users?):" \
            "open it (chmod o+x on the parents), or set DATABASE_URL"

    local version
    version=$("$PG_BIN/pg_ctl" --version | sed -E 's/^[^0-9]*([0-9]+).*/\1/')
    if [[ -f $PG_DATA/PG_VERSION && $(<"$PG_DATA/PG_VERSION") != "$version" ]]; then
        die "$PG_DATA was made by PostgreSQL $(<"$PG_DATA/PG_VERSION"), but only version $version was found:" \
            "delete .run/pg (throwaway data) to recreate it"
    fi
    if [[ ! -f $PG_DATA/PG_VERSION ]]; then
        say "creating a throwaway PostgreSQL $version cluster in .run/pg (once)"
        rm -rf "$PG_DATA" # a half-made cluster from an interrupted initdb: initdb wants it empty
        as_pg_user "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --auth=trust --encoding=UTF8 --locale=C \
            >"$PG_DIR/initdb.log" 2>&1 || die "initdb failed, see .run/pg/initdb.log"
    fi

    # A unix socket path is limited to 107 bytes: in a deeply nested clone, TCP only.
    local sockdir=$PG_DIR/sock
    ((${#sockdir} < 80)) || sockdir=""
    # pg_ctl hands -o to /bin/sh, hence the quoting.
    as_pg_user "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_DIR/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $REMIT_PG_PORT -k $(printf '%q' "$sockdir")" start >/dev/null ||
        die "the throwaway PostgreSQL did not start, see .run/pg/server.log"
    STARTED_PG=1
    say "started a throwaway PostgreSQL on 127.0.0.1:$REMIT_PG_PORT (data in .run/pg; stopped on exit)"
}

stop_postgres() {
    say "stopping the throwaway PostgreSQL"
    as_pg_user "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 30 stop >/dev/null ||
        say "pg_ctl stop failed, see .run/pg/server.log"
}

ensure_redis() {
    [[ -n $REDIS_URL_IS_DEFAULT ]] || return 0
    port_open 127.0.0.1 "$REMIT_REDIS_PORT" && return 0
    command -v redis-server >/dev/null ||
        die "Redis is not running on 127.0.0.1:$REMIT_REDIS_PORT and no redis-server was found:" \
            "install redis (apt-get install redis-server) or set REDIS_URL, or use docker compose"
    mkdir -p "$REDIS_DIR"
    rm -f "$REDIS_PIDFILE"
    # Nothing to keep: Redis only carries doorbells, PostgreSQL is the source of truth.
    redis-server --bind 127.0.0.1 --port "$REMIT_REDIS_PORT" --save "" --appendonly no \
        --dir "$REDIS_DIR" --logfile "$REDIS_DIR/redis.log" \
        --daemonize yes --pidfile "$REDIS_PIDFILE" ||
        die "the throwaway Redis did not start, see .run/redis/redis.log"
    STARTED_REDIS=1 # set before the wait: if it hangs, the exit trap still stops it
    wait_for_port 127.0.0.1 "$REMIT_REDIS_PORT" 20 ||
        die "the throwaway Redis does not answer on 127.0.0.1:$REMIT_REDIS_PORT, see .run/redis/redis.log"
    say "started a throwaway Redis on 127.0.0.1:$REMIT_REDIS_PORT (stopped on exit)"
}

stop_redis() {
    local pid="" deadline=$((SECONDS + 10))
    [[ -f $REDIS_PIDFILE ]] && pid=$(<"$REDIS_PIDFILE")
    [[ -n $pid ]] || return 0
    say "stopping the throwaway Redis"
    kill -TERM "$pid" 2>/dev/null || return 0
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            kill -KILL "$pid" 2>/dev/null
            break
        fi
        sleep 0.2
    done
    rm -f "$REDIS_PIDFILE"
}

stop_servers() {
    [[ -z $STARTED_REDIS ]] || stop_redis
    [[ -z $STARTED_PG ]] || stop_postgres
    STARTED_REDIS="" STARTED_PG=""
}

# --- the processes of `up` ----------------------------------------------------------------

# Prefixes each line of its input with [name]. It ignores Ctrl-C and SIGTERM so that it
# still prints the servers' shutdown logs; it ends when they close their output.
prefix_lines() {
    trap '' INT TERM HUP
    if sed -u q </dev/null >/dev/null 2>&1; then
        exec sed -u "s/^/[$1] /"
    fi
    local line # no GNU sed: slower, same result
    while IFS= read -r line || [[ -n $line ]]; do
        printf '[%s] %s\n' "$1" "$line"
    done
}

# start_app NAME COMMAND...: starts COMMAND in the background with its output prefixed.
start_app() {
    local name=$1 out
    shift
    # The prefixer is opened here, so that it is our child and not the server's: gunicorn
    # and Celery reap their own children and must not meet a stranger among them.
    exec {out}> >(prefix_lines "$name")
    # setsid puts the server in a process group of its own: Ctrl-C then reaches only this
    # script, which stops each server with SIGTERM, its graceful stop (a terminal's SIGINT
    # is a quick stop for gunicorn); and a KILL can take the whole group, pool children
    # included. As a background child we are no group leader, so setsid execs in place
    # and $! is the server's own PID.
    if command -v setsid >/dev/null; then
        setsid "$@" >&"$out" 2>&1 {out}>&- &
    else
        "$@" >&"$out" 2>&1 {out}>&- &
    fi
    APP_NAMES+=("$name")
    APP_PIDS+=("$!")
    exec {out}>&-
}

# Returns 1, naming it, when one of the processes has ended on its own.
apps_alive() {
    local i rc
    for i in "${!APP_PIDS[@]}"; do
        if ! kill -0 "${APP_PIDS[i]}" 2>/dev/null; then
            rc=0
            wait "${APP_PIDS[i]}" 2>/dev/null || rc=$?
            say "${APP_NAMES[i]} exited on its own (status $rc); stopping the others"
            return 1
        fi
    done
}

# How long each process may take to stop after SIGTERM before it is killed. The worker
# finishes the settlements it has started (warm shutdown); gunicorn lets requests,
# long polls included, finish.
stop_timeout() {
    case $1 in
        worker | web) echo 30 ;;
        *) echo 10 ;;
    esac
}

# Stops the processes of `up`: SIGTERM to each, then SIGKILL to the process group of any
# still running after its bound. Returns 1 if one had to be killed.
stop_apps() {
    ((${#APP_PIDS[@]})) || return 0
    local i pid alive forced=0 start=$SECONDS names=()
    for i in "${!APP_PIDS[@]}"; do
        kill -TERM "${APP_PIDS[i]}" 2>/dev/null && names+=("${APP_NAMES[i]}")
    done
    ((${#names[@]} == 0)) || say "stopping ${names[*]} (Ctrl-C again to kill them at once)"
    while :; do
        alive=0
        for i in "${!APP_PIDS[@]}"; do
            pid=${APP_PIDS[i]}
            kill -0 "$pid" 2>/dev/null || continue
            if [[ -n $HURRY ]] || ((SECONDS - start >= $(stop_timeout "${APP_NAMES[i]}"))); then
                if [[ -n $HURRY ]]; then
                    say "killing ${APP_NAMES[i]}"
                else
                    say "${APP_NAMES[i]} did not stop within $(stop_timeout "${APP_NAMES[i]}") s: killing it"
                fi
                kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
                forced=1
            else
                alive=1
            fi
        done
        ((alive)) || break
        sleep 0.2
    done
    # Whatever a server left behind in its process group (an orphaned pool process).
    for pid in "${APP_PIDS[@]}"; do
        kill -KILL -- "-$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    APP_PIDS=() APP_NAMES=()
    return "$forced"
}

# Flower started before a worker answers shows no workers until it inspects again, so it
# waits for a ping (bounded), watching the others meanwhile.
wait_for_worker() {
    local deadline=$((SECONDS + 60))
    say "waiting for the worker to answer a ping"
    until "${BIN}celery" --app worker.app inspect ping --timeout 1 >/dev/null 2>&1; do
        [[ -z $STOP_SIGNAL ]] || return 1
        apps_alive || return 1
        ((SECONDS < deadline)) || {
            say "the worker did not answer a ping within 60 s; stopping"
            return 1
        }
        sleep 1
    done
}

# Waits, watching the processes, until the HTTP ports answer.
wait_for_http() {
    local deadline=$((SECONDS + 60)) port
    for port in "$PORT" "$FLOWER_PORT"; do
        until port_open 127.0.0.1 "$port"; do
            [[ -z $STOP_SIGNAL ]] || return 1
            apps_alive || return 1
            ((SECONDS < deadline)) || {
                say "nothing answers on 127.0.0.1:$port after 60 s; stopping"
                return 1
            }
            sleep 0.5
        done
    done
}

# --- commands -----------------------------------------------------------------------------

# Sets SERVICE to the command line of one service: the same for `up` and for the
# single-service commands that docker compose runs.
service_command() {
    case $1 in
        web) SERVICE=("${BIN}gunicorn" --config python:web.gunicorn_conf web.wsgi:app) ;;
        worker) SERVICE=("${BIN}celery" --app worker.app worker --loglevel INFO) ;;
        beat) SERVICE=("${BIN}celery" --app worker.app beat --loglevel INFO --schedule "$(beat_schedule_file)") ;;
        flower) SERVICE=("${BIN}celery" --app worker.app flower --port="$FLOWER_PORT") ;;
    esac
}

# Beat keeps its last run times in .run; where the checkout is read-only to the user (the
# Docker image's /app), in the temporary folder instead.
beat_schedule_file() {
    if mkdir -p "$RUN" 2>/dev/null && [[ -w $RUN ]]; then
        echo "$RUN/celerybeat-schedule"
    else
        echo "${TMPDIR:-/tmp}/remit-celerybeat-schedule"
    fi
}

# Refuses, with the one line that says why, a configuration the processes would refuse at
# start (REMIT_ENV=production without SUPERUSER_PASSWORD or SECRET_KEY...): the same check
# they make, before anything starts.
check_settings() {
    "${BIN}python3" -m common.settings || exit 2
}

# Flower is always behind a password. FLOWER_BASIC_AUTH is "user:password" (Flower reads it
# from the environment, as it would --basic-auth: an environment stays out of `ps`), else
# FLOWER_USER and FLOWER_PASSWORD; in development, when none is set, a random password is
# made for this run and FLOWER_GENERATED is set so that it is printed once.
FLOWER_GENERATED=""
flower_auth() {
    if [[ -z ${FLOWER_BASIC_AUTH:-} && -n ${FLOWER_USER:-}${FLOWER_PASSWORD:-} ]]; then
        [[ -n ${FLOWER_USER:-} && -n ${FLOWER_PASSWORD:-} ]] ||
            die "set both FLOWER_USER and FLOWER_PASSWORD (or FLOWER_BASIC_AUTH=user:password)"
        FLOWER_BASIC_AUTH="$FLOWER_USER:$FLOWER_PASSWORD"
    fi
    if [[ -z ${FLOWER_BASIC_AUTH:-} ]]; then
        [[ $REMIT_ENV == development ]] ||
            die "Flower needs a password when REMIT_ENV=$REMIT_ENV: set FLOWER_BASIC_AUTH=user:password (or FLOWER_USER and FLOWER_PASSWORD)"
        FLOWER_BASIC_AUTH="operator:$("${BIN}python3" -c 'import secrets; print(secrets.token_urlsafe(18))')"
        FLOWER_GENERATED=1
    fi
    [[ $FLOWER_BASIC_AUTH =~ ^[^:,]+:[^,]+$ ]] ||
        die "FLOWER_BASIC_AUTH must be user:password (with no comma), e.g. operator:a-long-secret"
    [[ $REMIT_ENV != production || $FLOWER_BASIC_AUTH != *:change-me* ]] ||
        die "the Flower password is .env.example's placeholder: set a real one when REMIT_ENV=production"
    export FLOWER_BASIC_AUTH
}

# One service in the foreground. exec: it becomes this process, so a container's SIGTERM
# reaches it directly; no throwaway servers, nothing to clean up.
cmd_service() {
    local name=$1
    shift
    (($# == 0)) || { say "$name takes no arguments"; usage >&2; exit 2; }
    check_settings
    if [[ $name == flower ]]; then
        flower_auth
        [[ -z $FLOWER_GENERATED ]] || say "Flower login for this run: ${FLOWER_BASIC_AUTH%%:*} / ${FLOWER_BASIC_AUTH#*:}"
    fi
    service_command "$name"
    trap - EXIT INT TERM HUP PIPE
    exec "${SERVICE[@]}"
}

migrate() {
    local rc=0
    run_child "${BIN}python3" -m common.migrate || rc=$?
    [[ -z $CHILD_SIGNAL ]] || exit 130 # interrupted: the traceback above says enough
    ((rc == 0)) || die "migrations failed (python -m common.migrate exited with $rc)"
}

cmd_up() {
    (($# == 0)) || { say "up takes no arguments"; usage >&2; exit 2; }
    # Fail now rather than after the migrations, with a server retrying its bind.
    local port
    for port in PORT FLOWER_PORT; do
        ! port_open 127.0.0.1 "${!port}" ||
            die "something already listens on 127.0.0.1:${!port}: stop it, or choose another $port"
    done
    check_settings
    flower_auth
    ensure_postgres
    ensure_redis
    migrate
    mkdir -p "$RUN"
    export PYTHONUNBUFFERED=1 # logs reach the terminal as they are written

    # From here on a signal means "stop": the loops below notice it and return.
    trap 'STOP_SIGNAL=INT' INT
    trap 'STOP_SIGNAL=TERM' TERM
    trap 'STOP_SIGNAL=HUP' HUP

    local name
    for name in web worker beat; do
        service_command "$name"
        start_app "$name" "${SERVICE[@]}"
    done
    wait_for_worker || stop_now
    # Behind FLOWER_BASIC_AUTH (flower_auth); its /metrics and /healthcheck skip auth, so
    # loopback only on a developer's machine all the same.
    service_command flower
    start_app flower "${SERVICE[@]}" --address=127.0.0.1
    wait_for_http || stop_now

    say "up — API    http://127.0.0.1:$PORT"
    say "     docs   http://127.0.0.1:$PORT/docs"
    if [[ -n $FLOWER_GENERATED ]]; then
        say "     Flower http://127.0.0.1:$FLOWER_PORT  user ${FLOWER_BASIC_AUTH%%:*}, password ${FLOWER_BASIC_AUTH#*:} (made for this run)"
    else
        say "     Flower http://127.0.0.1:$FLOWER_PORT  (FLOWER_BASIC_AUTH)"
    fi
    say "Ctrl-C stops everything"

    while [[ -z $STOP_SIGNAL ]]; do
        apps_alive || exit 1
        # sleep in the background: a signal interrupts wait at once, not a foreground sleep.
        sleep 1 &
        wait $! || true
    done
    stop_now
}

# Leaves `up`; the EXIT trap stops the processes (and turns 0 into 1 if one had to be
# killed). A stop that was asked for is a success, anything else a failure.
stop_now() {
    if [[ -n $STOP_SIGNAL ]]; then
        say "SIG$STOP_SIGNAL received"
        exit 0
    fi
    exit 1
}

cmd_test() {
    ensure_postgres
    ensure_redis
    local rc=0
    run_child "${BIN}python3" -m pytest "$@" || rc=$?
    if ((rc == 5)); then
        say "pytest collected no tests: that is a failure"
    fi
    exit "$rc"
}

# The same services under Docker Compose, each running `./run.sh <service>` in the image.
cmd_docker() {
    command -v docker >/dev/null 2>&1 || die "docker is not installed: use ./run.sh, or install Docker"
    docker info >/dev/null 2>&1 || die "no Docker engine answers here: use ./run.sh instead"
    [[ -f .env ]] || die "no .env: copy .env.example to .env and set its secrets first"
    trap - EXIT INT TERM HUP PIPE
    exec docker compose up --build "$@"
}

# Operator commands act on the configured servers; they never start throwaway ones.
cmd_cli() {
    trap - EXIT INT TERM HUP PIPE
    exec "${BIN}python3" -m worker.cli "$@"
}

cmd_audit() {
    cmd_cli audit "$@"
}

# The benchmark starts its own PostgreSQL and Redis (never the configured ones) and
# stops them itself; Ctrl-C or SIGTERM reaches it as SIGINT, its clean stop.
cmd_bench() {
    local rc=0
    run_child "${BIN}python3" -m bench "$@" || rc=$?
    exit "$rc"
}

cmd_migrate() {
    (($# == 0)) || { say "migrate takes no arguments"; usage >&2; exit 2; }
    check_settings
    ensure_postgres
    migrate
}

main() {
    local command=${1:-up}
    (($# == 0)) || shift
    case $command in
        help | -h | --help)
            usage
            return 0
            ;;
        up | test | migrate | web | worker | beat | flower | cli | audit | docker | bench) ;;
        *)
            say "unknown command: $command"
            usage >&2
            exit 2
            ;;
    esac
    # A closed stdin (some CI runners) would make "<&0" fail: read from /dev/null instead.
    { : <&0; } 2>/dev/null || exec </dev/null
    trap on_exit EXIT
    default_traps
    # A closed output (`./run.sh | tee log`, tee gone on Ctrl-C) must not kill this script
    # before its EXIT trap has stopped everything: a failed write ends it through set -e.
    trap '' PIPE
    ensure_venv
    export_defaults
    case $command in
        web | worker | beat | flower) cmd_service "$command" "$@" ;;
        *) "cmd_$command" "$@" ;;
    esac
}

main "$@"

#!/usr/bin/env bash
# Remit's one entry point, for developers, CI and the Docker image. `./run.sh help` lists
# the commands.
#
# This script only prepares Python: it creates .venv, installs what the command needs
# (requirements-dev.txt for test and bench, requirements.txt for the rest), each again
# only when its file changes, then hands over to `python -m ops COMMAND ARGS` (ops/):
# that starts the servers and processes, and its exit status is this script's
# (documented at the top of ops/__main__.py: 0 success, pytest's own for test, 2 usage,
# 130 / 143 interrupted while preparing, 1 anything else).
#
# Overrides:
#   REMIT_USE_SYSTEM_PYTHON=1  use python3 from PATH, no .venv (the Docker image installs
#                              its dependencies system-wide)
#   REMIT_PG_PORT     for testing: port checked, and used for a throwaway PostgreSQL, when
#                     DATABASE_URL is unset (default 5432)
#   REMIT_REDIS_PORT  the same for Redis when REDIS_URL is unset (default 6379)

#: up             run the whole stack in the foreground (the default): migrate, then web, workers, beat, Flower
#: test [ARGS]    run the test suite: pytest ARGS (each run creates and drops its own database)
#: migrate        create the database if missing, apply the migrations and seed it, then exit
#: web            run only the API (gunicorn) in the foreground, as its docker compose service does
#: worker         run only a settlement worker (Celery) in the foreground
#: webhooks       run only the webhook delivery worker (Celery, threads) in the foreground
#: beat           run only the scheduler (Celery beat) in the foreground
#: flower         run only Flower in the foreground, behind FLOWER_BASIC_AUTH (Flower's FLOWER_* variables apply)
#: pgbouncer      run only PgBouncer (transaction pooling) in front of DATABASE_URL's PostgreSQL, in the foreground
#: bench [--quick]  benchmark the real stack on its own throwaway servers (bench/README.md; --help)
#: soak [--minutes N]  run the real stack at half its capacity for N minutes (30); is memory and p99 flat? (bench/README.md)
#: docker ARGS   the stack under Docker Compose: docker compose up --build ARGS (needs a Docker engine and .env)
#: cli ARGS       the operator CLI (python -m worker.cli): deposit, requeue, audit, sweep, stats, ...
#: audit          check every ledger invariant of the database; exit 1 on any violation
#: help           list these commands

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
VENV=$PWD/.venv

say() { printf 'remit: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

usage() {
    echo "usage: ./run.sh [command] [args]"
    sed -n 's/^#: /  /p' "$PWD/$(basename "${BASH_SOURCE[0]}")"
    echo "configuration: environment variables, see README.md"
}

file_sha256() {
    "$VENV/bin/python" -c 'import hashlib, sys; print(hashlib.sha256(b"".join(open(f, "rb").read() for f in sys.argv[1:])).hexdigest())' "$@"
}

# install FILE STAMP HASHED_FILES...: pip install -r FILE into .venv unless STAMP holds the
# sha256 of HASHED_FILES from the last successful install.
install() {
    local file=$1 stamp=$VENV/$2 want have=""
    shift 2
    want=$(file_sha256 "$@")
    [[ -f $stamp ]] && have=$(<"$stamp")
    [[ $want != "$have" ]] || return 0
    say "installing $file into .venv"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$file" ||
        die "pip install -r $file failed (see above)"
    echo "$want" >"$stamp"
}

# Creates .venv once, then installs the runtime (requirements.txt) or, for the commands
# that need them, the tests, bench and lint tools too (requirements-dev.txt includes the
# runtime). Each has its own stamp: moving between `up` and `test` reinstalls nothing.
ensure_venv() {
    if [[ ! -x $VENV/bin/python ]]; then
        command -v python3 >/dev/null ||
            die "python3 was not found: install Python 3.11 or newer (apt-get install python3 python3-venv)"
        say "creating .venv"
        python3 -m venv "$VENV" ||
            die "python3 -m venv failed: install the venv module (apt-get install python3-venv)"
    fi
    # A current development install holds the runtime too: nothing to do for `up` then.
    if [[ $1 == dev ]]; then
        install requirements-dev.txt .requirements-dev.sha256 requirements-dev.txt requirements.txt
    elif [[ $(file_sha256 requirements-dev.txt requirements.txt) != "$(cat "$VENV/.requirements-dev.sha256" 2>/dev/null)" ]]; then
        install requirements.txt .requirements.sha256 requirements.txt
    fi
}

main() {
    local command=${1:-up} needs=runtime
    (($# == 0)) || shift
    case $command in
        help | -h | --help)
            usage
            return 0
            ;;
        test | bench | soak) needs=dev ;;
        up | migrate | web | worker | webhooks | beat | flower | pgbouncer | cli | audit | docker) ;;
        *)
            say "unknown command: $command"
            usage >&2
            exit 2
            ;;
    esac
    # A closed stdin (some CI runners) would trouble pytest: read from /dev/null instead.
    { : <&0; } 2>/dev/null || exec </dev/null
    local python=python3
    if [[ ${REMIT_USE_SYSTEM_PYTHON:-} != 1 ]]; then
        ensure_venv "$needs"
        python=$VENV/bin/python
    fi
    exec "$python" -m ops "$command" "$@"
}

main "$@"

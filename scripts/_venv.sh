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
    echo "fanout: installing dependencies into .venv ..." >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev,embedded]' \
        || { echo "fanout: pip install failed (see above)" >&2; exit 1; }
    touch "$stamp"
fi

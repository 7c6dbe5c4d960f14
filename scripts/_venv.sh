# Sourced by the scripts: create ./.venv on first use and install the project with an extra.
# torch==2.13.0 is pinned in pyproject.toml: on a machine with that CPU wheel at hand pip takes it.
ensure_venv() {
    local extra="$1"
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
        .venv/bin/python -m pip install --quiet --upgrade pip
    fi
    . .venv/bin/activate
    local stamp=".venv/.installed-$extra"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        python -m pip install --quiet -e ".[$extra]"
        touch "$stamp"
    fi
}

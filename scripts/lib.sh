# Shared by scripts/serve and scripts/test: install missing Debian packages, non-interactively.

# ensure_packages PKG...: installs the packages that are not installed yet (apt-get, no prompts).
ensure_packages() {
    local missing=()
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        sudo=(sudo)
    fi
    echo "installing missing packages: ${missing[*]}" >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# ensure_pip CMD=REQUIREMENT...: installs REQUIREMENT (pip, quietly, no prompts) unless the
# command CMD is there and `CMD --version` prints a version REQUIREMENT's major allows, e.g.
# `ensure_pip 'schemathesis=schemathesis>=4.32,<5'` (its command-line flags change between
# major versions).
ensure_pip() {
    local missing=()
    for spec in "$@"; do
        local cmd="${spec%%=*}" requirement="${spec#*=}"
        local major
        major=$(printf '%s' "$requirement" | sed -n 's/.*>=\{0,1\}\([0-9][0-9]*\)\..*/\1/p' | head -n 1)
        if ! command -v "$cmd" >/dev/null 2>&1 \
            || ! "$cmd" --version 2>/dev/null | grep -Eq "version ${major}\."; then
            missing+=("$requirement")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    echo "installing missing Python packages: ${missing[*]}" >&2
    local pip=(python3 -m pip install --quiet --disable-pip-version-check --no-input)
    # Debian's own python3 refuses installs outside a virtualenv (PEP 668) unless told.
    "${pip[@]}" "${missing[@]}" 2>/dev/null || "${pip[@]}" --break-system-packages "${missing[@]}"
}

# ensure_seed003: seed 003's own stack, which the benchmark runs beside its miss-heavy walk
# (bench/seed003: node 20 or later, and its packages as package-lock.json pins them). Nothing
# here is fatal: without them the suite leaves that row out and says why. Debian 12's own node
# is 18, too old for its fastify: installed from Debian if there is none, then reported.
ensure_seed003() {
    command -v node >/dev/null || ensure_packages nodejs npm
    command -v npm >/dev/null || ensure_packages npm
    local major
    major=$(node -p "process.versions.node.split('.')[0]" 2>/dev/null || echo 0)
    if [ "$major" -lt 20 ]; then
        echo "node $major is older than 20: the benchmark leaves seed 003's row out (install node 20 or later to run it)" >&2
        return 0
    fi
    [ -d bench/seed003/node_modules/fastify ] && return 0
    (cd bench/seed003 && npm ci --no-audit --no-fund --loglevel=error) \
        || echo "npm ci in bench/seed003 failed: the benchmark leaves seed 003's row out" >&2
}

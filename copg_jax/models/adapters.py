"""LoRA adapters on whole decoders: adding, removing and merging them, and PEFT's adapter format in and out.

    sites = resolve_targets("llama", ["q_proj", "v_proj"])      # PEFT's module names -> our sites
    model = add_adapters(base, LoRASpec(rank=8, alpha=16, targets=sites), key, mesh=mesh)
    base = without_adapters(model)       # the frozen base (the reference policy): the same arrays, no copy
    merged = merge_adapters(model)       # a plain Decoder with W + alpha / r * A B folded into each kernel
    save_peft_adapter(model, out)        # adapter_config.json + adapter_model.safetensors (PEFT's format)
    model = load_peft_adapter(base, folder, mesh=mesh)   # a PEFT adapter (made by peft or by us) on `base`

PEFT's format: tensors `base_model.model.<HF module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]
(nn.Linear layouts, also for GPT-2's Conv1D modules), float32 here; the config's `r`, `lora_alpha`,
`lora_dropout`, `target_modules`, `fan_in_fan_out`. On the fused modules (GPT-2 `c_attn`, GPT-NeoX
`query_key_value`, Phi-3 `qkv_proj` and `gate_up_proj`) B's rows follow HF's output order ([q | k | v], or
[H, 3, Dh] for GPT-NeoX; [gate | up]). Each family's `LORA` (`hf_io.LoRALayout`) names its modules.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from copg_jax import paths
from copg_jax.models.config import family, read_hf_config, read_json
from copg_jax.models.decoder import Decoder
from copg_jax.models.hf_io import LoRALayout, read_safetensors, write_safetensors
from copg_jax.models.hub import MULTIMODAL_MODEL_TYPES, param_shardings
from copg_jax.models.layers import MLP, Attention, Dense, Fused
from copg_jax.models.lora import FUSED_SITES, LoRASpec, weight_norm
from copg_jax.sharding import global_array, to_host

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_DEFAULT_ALPHA = 8  # LoraConfig's lora_alpha where adapter_config.json has none
# The layers of a multimodal checkpoint's language model, by its config.json's model_type, as PEFT names them
# on transformers 5's model (written so); adapters are also read with transformers 4's names.
MULTIMODAL_LAYERS = dict.fromkeys(MULTIMODAL_MODEL_TYPES, "model.language_model.layers")
WRAPPED_LAYERS = ("model.language_model.layers", "language_model.model.layers")
# adapter_config.json (PEFT's LoraConfig) keys we honour at any value: metadata, the variants (use_rslora,
# use_dora), training-time settings that leave the adapter's function alone (VeLoRA changes only the backward
# pass), and module selection (the sites come from the tensors). Any other key must be unset (None, false, {}
# or []) or in PLAIN_VALUES.
ANY_VALUE = frozenset(
    {
        "peft_type",
        "task_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "use_dora",
        "target_modules",
        "exclude_modules",
        "fan_in_fan_out",
        "layers_pattern",
        "megatron_core",
        "qalora_group_size",
        "eva_config",
        "velora_config",
        "ensure_weight_tying",
        "runtime_config",
    }
)
# values that mean plain LoRA on the unmodified base: initialisations that leave the base weights alone
# (PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA rewrite them; PEFT's conversion to a plain adapter saves True; MiCA
# keeps them but trains A alone, B frozen, which training here would not honour)
PLAIN_VALUES = {
    "bias": ("none",),
    "init_lora_weights": (True, False, "gaussian", "eva", "orthogonal"),
}
UNSET = (None, False, {}, [])


def layout(model_type: str) -> LoRALayout:
    return family(model_type).LORA


def resolve_targets(
    model_type: str, target_modules: Sequence[str] | str, num_layers: int = 1
) -> tuple[str, ...]:
    """Our sites (`lora.SITES`) that PEFT's `target_modules` select in a `model_type` model.

    A module is selected by a name it equals or ends with after a dot (PEFT's rule: "c_proj" selects GPT-2's
    attn.c_proj and mlp.c_proj, "attn.c_proj" only the first); [] means PEFT's default for the family and
    "all-linear" every adaptable module (the output head never is). A string that is a regular expression
    (PEFT's string form) selects the modules whose full names it matches (`model.layers.3.self_attn.q_proj`),
    which must be the same in each of the `num_layers` blocks; a plain string is one name.

    Raises:
      ValueError: a name selects no module of the family (the message lists its module names), or a
        pattern selects different modules in different blocks.
    """
    lay = layout(model_type)
    if target_modules == "all-linear":
        if adds := lay.all_linear_adds.get(model_type):
            ours = peft_target_modules(model_type, sorted(set(lay.modules.values())))
            raise ValueError(
                f"lora.target_modules: 'all-linear' on a {model_type} model also adapts {list(adds)} in "
                "PEFT, which take no adapter here; name the modules to adapt: "
                f"lora.target_modules=[{','.join(ours)}]"
            )
        return tuple(sorted(set(lay.modules.values())))
    if isinstance(target_modules, str):
        sites = _pattern_sites(lay, target_modules, num_layers, model_type)
        if sites:
            return sites
        target_modules = [target_modules]
    names = list(target_modules) or list(lay.default_targets)
    sites = set()
    for name in names:
        hits = [site for module, site in lay.modules.items() if module == name or module.endswith("." + name)]
        if not hits:
            known = sorted({m.rsplit(".", 1)[-1] for m in lay.modules} | set(lay.modules))
            raise ValueError(
                f"lora.target_modules: {name!r} names no module of a {model_type} model; its adaptable "
                f"modules: {known} (or 'all-linear')"
            )
        sites.update(hits)
    return tuple(sorted(sites))


def _pattern_sites(lay: LoRALayout, pattern: str, num_layers: int, model_type: str) -> tuple[str, ...]:
    """The sites whose full module names (the family's, or a multimodal model's language model's) `pattern`
    matches in full, as PEFT matches a string target_modules; () when it matches none or is no pattern.

    Raises:
      ValueError: it selects different sites in different blocks (PEFT's layers_to_transform, not supported),
        or modules that take no adapter here (the output head, the embeddings, the mixtures' experts, routers
        and Qwen2-MoE's shared expert), which PEFT may adapt.
    """
    try:
        regex = re.compile(pattern)
    except re.error:
        return ()
    top = lay.layers.rsplit(".", 1)[0]  # model.layers -> model, transformer.h -> transformer
    outside = ["lm_head", "embed_out", *(f"{top}.{e}" for e in ("embed_tokens", "wte", "wpe", "embed_in"))]
    unadapted = lay.unadapted.get(model_type, ())
    outside += [f"{layers}.0.{m}" for layers in (lay.layers, *WRAPPED_LAYERS) for m in unadapted]
    unadaptable = sorted({name.split(".0.", 1)[-1] for name in outside if regex.fullmatch(name)})
    if unadaptable:
        raise ValueError(
            f"lora.target_modules: the pattern {pattern!r} also selects {unadaptable}, which take no adapter "
            f"here (PEFT may adapt them); narrow it to the blocks' modules {sorted(lay.modules)}"
        )
    per_layer = [
        frozenset(
            site
            for module, site in lay.modules.items()
            for layers in (lay.layers, *WRAPPED_LAYERS)
            if regex.fullmatch(f"{layers}.{i}.{module}")
        )
        for i in range(num_layers)
    ]
    if len(set(per_layer)) > 1:
        chosen = {i: sorted(s) for i, s in enumerate(per_layer)}
        raise ValueError(
            f"lora.target_modules: the pattern {pattern!r} selects different modules in different blocks "
            f"({chosen}); adapters must sit on the same modules of every block"
        )
    return tuple(sorted(per_layer[0]))


def peft_target_modules(model_type: str, sites: Sequence[str]) -> list[str]:
    """The shortest PEFT `target_modules` names that select exactly `sites` (a module's last name part when
    no other module shares it outside `sites`, else its name within the block)."""
    lay, sites = layout(model_type), set(sites)
    names = set()
    for module, site in lay.modules.items():
        if site in sites:
            leaf = module.rsplit(".", 1)[-1]
            clash = any(m.rsplit(".", 1)[-1] == leaf and s not in sites for m, s in lay.modules.items())
            names.add(module if clash else leaf)
    return sorted(names)


def _adapted_modules(model: Decoder):
    """(module, attribute) of every adapter in `model`: (Dense, "lora"), (Attention, "qkv_lora") and (MLP,
    "gate_up_lora")."""
    found = []
    for _, module in nnx.iter_modules(model):
        if isinstance(module, Dense) and module.lora is not None:
            found.append((module, "lora"))
        elif isinstance(module, Attention) and module.qkv_lora is not None:
            found.append((module, "qkv_lora"))
        elif isinstance(module, MLP) and module.gate_up_lora is not None:
            found.append((module, "gate_up_lora"))
    return found


def _adapted_denses(module, attribute: str) -> tuple[list[Dense], Fused | None]:
    """The Dense layers an adapter adapts, and how its fused kernel joins theirs (None: one Dense, itself)."""
    return ([module], None) if attribute == "lora" else module.fused()


def _adapted_kernel(denses: list[Dense], fused: Fused | None) -> jax.Array:
    """The kernel [*lead, *in, *out] an adapter adapts: its Dense's, or the fused one of several."""
    return denses[0].kernel[...] if fused is None else fused.join([d.kernel[...] for d in denses])


def _lora_decoder(model: Decoder, spec: LoRASpec, rngs: nnx.Rngs) -> Decoder:
    return Decoder(model.config, rngs=rngs, lora=spec, **model.settings)


def _abstract_lora(model: Decoder, spec: LoRASpec) -> tuple[nnx.GraphDef, nnx.State]:
    """(graph definition, abstract adapter state) of `model` with adapters on `spec`'s sites."""
    abstract = nnx.eval_shape(lambda: _lora_decoder(model, spec, nnx.Rngs(0)))
    graphdef, adapters, _ = nnx.split(abstract, nnx.LoRAParam, ...)
    return graphdef, adapters


def add_adapters(model: Decoder, spec: LoRASpec, key: jax.Array, mesh: Mesh | None = None) -> Decoder:
    """`model` with fresh adapters on `spec`'s sites (A drawn from `key`, B = 0): it computes exactly what
    `model` computes. The base arrays are shared, not copied; with `mesh` each adapter is created directly in
    its sharding. The same key gives the same adapters with or without a mesh or `scan_layers`."""
    if model.lora_spec is not None:
        raise ValueError("the model already has LoRA adapters")
    graphdef, abstract = _abstract_lora(model, spec)
    init = jax.jit(
        lambda k: nnx.state(_lora_decoder(model, spec, nnx.Rngs(params=0, lora=k)), nnx.LoRAParam),
        out_shardings=None if mesh is None else param_shardings(abstract, mesh),
    )
    adapted = nnx.merge(graphdef, init(key), nnx.state(model))
    for module, attribute in _adapted_modules(adapted) if spec.dora else ():  # DoRA: m = ||W|| at the start
        lora = getattr(module, attribute)
        kernel = _adapted_kernel(*_adapted_denses(module, attribute))
        norm = weight_norm(kernel, lora.num_in, lead=int(model.scan_layers))
        lora.m = lora.m.replace(jax.device_put(norm, lora.m.get_value().sharding))
    return adapted


def without_adapters(model: Decoder) -> Decoder:
    """The base of a LoRA model (its adapters dropped): a new module graph over the same base arrays, which
    computes exactly what the base model computes. A model without adapters is returned as it is."""
    if model.lora_spec is None:
        return model
    base = nnx.merge(*nnx.split(model))
    for module, attribute in _adapted_modules(base):
        setattr(module, attribute, None)
    base.lora_spec = None
    return base


def merge_adapters(model: Decoder) -> Decoder:
    """A plain Decoder whose kernels are W + (alpha / r) A B (computed in float32, or the kernels' dtype when
    wider, and stored in the kernels' dtype): the LoRA model's function without adapters (dropout off)."""
    if model.lora_spec is None:
        return model
    merged = nnx.merge(*nnx.split(model))
    dtype = jnp.promote_types(merged.param_dtype, jnp.float32)
    for module, attribute in _adapted_modules(merged):
        lora = getattr(module, attribute)
        denses, fused = _adapted_denses(module, attribute)
        kernel = _adapted_kernel(denses, fused)
        new = kernel.astype(dtype) + lora.delta(dtype)
        if lora.m is not None:  # DoRA: (m / ||W + dW||) (W + dW)
            scale = lora.magnitude_scale(kernel).astype(dtype)
            lead = int(model.scan_layers)
            new = scale.reshape(scale.shape[:lead] + (1,) * lora.num_in + scale.shape[lead:]) * new
        for dense, part in zip(denses, [new] if fused is None else fused.split(new), strict=True):
            dense.kernel = dense.kernel.replace(part.astype(dense.kernel.dtype))
        setattr(module, attribute, None)
    merged.lora_spec = None
    return merged


# --------------------------------------------------------------------------------------- PEFT's format


def _site_path(site: str) -> tuple[str, ...]:
    """The path of `site`'s adapter within a block: ("attn", "q", "lora"), or ("attn", "qkv_lora") for a
    fused site."""
    part, name = site.split(".")
    return (part, f"{name}_lora") if site in FUSED_SITES else (part, name, "lora")


def _tensor_names(lay: LoRALayout, site: str, layer: int, layers: str | None = None) -> tuple[str, str, str]:
    """PEFT's (lora_A, lora_B, DoRA magnitude) tensor names of `site` in block `layer`, the blocks at module
    path `layers` (default: the family's, `lay.layers`)."""
    module = next(m for m, s in lay.modules.items() if s == site)
    stem = f"{PREFIX}{layers or lay.layers}.{layer}.{module}"
    return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight", f"{stem}.lora_magnitude_vector"


def _base_layers(lay: LoRALayout, base: str) -> str:
    """The blocks' module path in the model `base` (a folder, or "") names: a multimodal checkpoint's language
    model (MULTIMODAL_LAYERS, by its config.json), else the family's own."""
    if not base or not paths.isfile(paths.join(base, "config.json")):
        return lay.layers
    return MULTIMODAL_LAYERS.get(read_hf_config(base).get("model_type"), lay.layers)


def _block_modules(tensors: dict, layers: str) -> dict[str, list[int]]:
    """{module path in a block: the blocks whose lora_A it holds} of an adapter's tensors, the blocks at
    module path `layers`."""
    stem = re.compile(rf"{re.escape(PREFIX + layers)}\.(\d+)\.(.+)\.lora_A\.weight")
    out: dict[str, list[int]] = {}
    for name in tensors:
        if m := stem.fullmatch(name):
            out.setdefault(m.group(2), []).append(int(m.group(1)))
    return {module: sorted(blocks) for module, blocks in out.items()}


def _adapter_layers(lay: LoRALayout, tensors: dict) -> str:
    """The blocks' module path an adapter's tensors use: the family's, or a multimodal model's language
    model's (WRAPPED_LAYERS)."""
    for layers in (lay.layers, *WRAPPED_LAYERS):
        if _block_modules(tensors, layers):
            return layers
    return lay.layers


def _b_to_hf(b: np.ndarray, site: str, lay: LoRALayout) -> np.ndarray:
    """Our B [r, *out] -> PEFT's lora_B.weight [out, r] in HF's output order."""
    if site == "attn.qkv" and lay.qkv_per_head:  # [r, 3H, Dh] -> [r, H, 3, Dh]
        r, heads, dh = b.shape
        b = b.reshape(r, 3, heads // 3, dh).transpose(0, 2, 1, 3)
    return b.reshape(b.shape[0], -1).T


def _b_from_hf(weight: np.ndarray, shape: tuple[int, ...], site: str, lay: LoRALayout) -> np.ndarray:
    """PEFT's lora_B.weight [out, r] -> our B of `shape` [r, *out]."""
    b = weight.T
    if site == "attn.qkv" and lay.qkv_per_head:  # [H, 3, Dh] outputs -> ours [3H, Dh]
        r, heads, dh = shape
        return b.reshape(r, heads // 3, 3, dh).transpose(0, 2, 1, 3).reshape(shape)
    return b.reshape(shape)


def save_peft_adapter(
    model: Decoder, path: str | Path, base_model_name_or_path: str = "", write: bool = True
) -> None:
    """Writes `model`'s adapters as a PEFT LoRA adapter folder (adapter_config.json and
    adapter_model.safetensors, float32) that `peft.PeftModel.from_pretrained(base, path)` loads.

    When `base_model_name_or_path` is a multimodal checkpoint's folder (Gemma 3 from 4B: the model was
    loaded as its language model), the tensors are named for that model's language-model layers and
    `target_modules` is a pattern matching only those, so that the adapter loads on the multimodal base.

    Every process must call it (sharded adapters are gathered); `write=False` writes nothing (the processes
    beside process 0)."""
    spec = model.lora_spec
    if spec is None:
        raise ValueError("the model has no LoRA adapters to save")
    cfg, lay = model.config, layout(model.config.model_type)
    path = Path(path)
    flat = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    layers = _base_layers(lay, base_model_name_or_path)
    entries = []
    for layer in range(cfg.num_layers):
        for site in spec.targets:
            where = ("layers",) + (() if model.scan_layers else (layer,)) + _site_path(site)
            parts = ("a", "b", "m") if spec.dora else ("a", "b")
            arrays = [to_host(flat[where + (n,)]) for n in parts]
            if model.scan_layers:
                arrays = [x[layer] for x in arrays]
            hf = [arrays[0].reshape(-1, arrays[0].shape[-1]).T, _b_to_hf(arrays[1], site, lay)]
            hf += [_b_to_hf(arrays[2][None], site, lay)[:, 0]] if spec.dora else []  # m: B's output order
            for name, array in zip(_tensor_names(lay, site, layer, layers)[: len(hf)], hf, strict=True):
                entries.append((name, array.shape, np.dtype(np.float32), lambda x=array: x))
    if not write:
        return
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / WEIGHTS_FILE, entries)
    targets = peft_target_modules(cfg.model_type, spec.targets)
    if layers != lay.layers:  # PEFT's string form: a full-match pattern of module names (not the vision's)
        targets = rf"{re.escape(layers)}\.\d+\..*\b({'|'.join(map(re.escape, targets))})"
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": targets,
        "fan_in_fan_out": lay.fan_in_fan_out,
        "bias": "none",
        "use_rslora": spec.rslora,
        "use_dora": spec.dora,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def _plain(key: str, value) -> bool:
    """Whether adapter_config.json's `key`: `value` leaves the adapter plain LoRA (see ANY_VALUE)."""
    if key in ANY_VALUE:
        return True
    # compared with their types: 0 is no False (layers_to_transform: 0 adapts block 0 only), 1 no True
    return any(
        type(value) is type(plain) and value == plain for plain in (*PLAIN_VALUES.get(key, ()), *UNSET)
    )


def read_peft_config(folder: str | Path) -> dict:
    """adapter_config.json of a PEFT LoRA adapter folder, checked for settings we cannot honour; a missing
    lora_alpha is PEFT's default, 8.

    Raises:
      FileNotFoundError: no adapter_config.json.
      ValueError: not a LoRA adapter, or one using a PEFT feature not supported here (named).
    """
    file = paths.join(folder, CONFIG_FILE)
    if not paths.isfile(file):
        named = []
        if paths.isdir(folder):
            named = [
                n for n in sorted(paths.listdir(folder)) if paths.isfile(paths.join(folder, n, CONFIG_FILE))
            ]
        hint = f" (it holds named adapters: {', '.join(n + '/' for n in named)}; give one's folder)"
        hint = hint if named else ""
        raise FileNotFoundError(f"no {CONFIG_FILE} in {folder}: not a PEFT adapter folder{hint}")
    config = read_json(file)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type {config.get('peft_type')!r} is not LORA")
    if unsupported := [f"{key}={value!r}" for key, value in config.items() if not _plain(key, value)]:
        raise ValueError(f"{file}: not supported (only plain LoRA is): {', '.join(unsupported)}")
    if type(config.get("r")) is not int or config["r"] < 1:
        raise ValueError(f"{file}: r={config.get('r')!r}, expected the adapter's rank (an integer >= 1)")
    alpha = config.setdefault("lora_alpha", PEFT_DEFAULT_ALPHA)
    if type(alpha) not in (int, float) or not math.isfinite(alpha):
        raise ValueError(f"{file}: lora_alpha={alpha!r}, expected a number")
    return config


def _adapter_tensors(folder: str | Path) -> tuple[Path, dict]:
    """(the weights file, its tensors by name: memory-mapped arrays) of a PEFT adapter folder."""
    folder = paths.stage(folder)
    file = Path(folder) / WEIGHTS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {folder} (only safetensors adapters are read)")
    return file, {name: array for name, (array, _) in read_safetensors(file).items()}


def _sites(file: Path, tensors: dict, model_type: str) -> tuple[str, tuple[str, ...]]:
    """(the blocks' module path the adapter's tensors use, the sites whose block-0 tensors it holds);
    ValueError naming `file` when it holds none."""
    lay = layout(model_type)
    blocks = _adapter_layers(lay, tensors)
    modules = _block_modules(tensors, blocks)
    sites = tuple(sorted({s for m, s in lay.modules.items() if m in modules}))
    if not sites:
        headless = lay.layers.split(".", 1)[-1]  # model.layers -> layers: tensors of a model without its head
        if headless != lay.layers and _block_modules(tensors, headless):
            raise ValueError(
                f"{file}: its LoRA weights are named for a {model_type} model without its LM head "
                f"({PREFIX}{headless}.N...: an adapter made on AutoModel, task FEATURE_EXTRACTION), which "
                "PEFT would not apply to a *ForCausalLM; copg adapts causal LMs"
            )
        raise ValueError(f"{file} holds no LoRA weights of a {model_type} model's modules ({lay.layers}.N)")
    return blocks, sites


def adapter_sites(folder: str | Path, model_type: str) -> tuple[str, ...]:
    """The sites a PEFT adapter folder adapts in a `model_type` model, read from its tensors (its
    `target_modules` may be a pattern, or name modules of a multimodal model's other towers)."""
    return _sites(*_adapter_tensors(folder), model_type)[1]


def peft_selects(key: str, target_modules: Sequence[str] | str, exclude_modules: Sequence[str] | str) -> bool:
    """Whether PEFT's LoRA puts an adapter on the module of full name `key` (model.layers.3.self_attn.q_proj)
    under `target_modules` and `exclude_modules` (peft.tuners.tuners_utils.check_target_module_exists): a
    string is a pattern the whole name must match, a list holds names the module's equals or ends with after
    a dot; an excluded module takes none. "all-linear" selects every module of the blocks."""
    if exclude_modules and _listed(key, exclude_modules):
        return False
    return target_modules == "all-linear" or _listed(key, target_modules)


def _listed(key: str, names: Sequence[str] | str) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return key in names or any(key.endswith(f".{name}") for name in names)


def _check_targets(file: Path, config: dict, tensors: dict, blocks: str, sites: tuple[str, ...], cfg) -> None:
    """Refuses an adapter whose tensors adapt modules its config does not select (`target_modules` and
    `exclude_modules`, as PEFT reads them, over the modules of every block): PEFT builds the adapter from the
    config and drops those tensors without a word, so the file means two models. One whose config and
    tensors agree on a module in some blocks only is refused as such. An adapter without `target_modules` is
    not compared (PEFT takes its default for the family)."""
    targets, excluded = config.get("target_modules"), config.get("exclude_modules") or []
    if not targets:
        return
    lay = layout(cfg.model_type)
    which = f"target_modules {targets!r}" + (f" and exclude_modules {excluded!r}" if excluded else "")
    held = _block_modules(tensors, blocks)
    for module in sorted(held):
        chosen = [
            i for i in range(cfg.num_layers) if peft_selects(f"{blocks}.{i}.{module}", targets, excluded)
        ]
        if held[module] == chosen and len(chosen) < cfg.num_layers:  # the config and weights agree
            raise ValueError(
                f"{file}: its {which} select {module} in blocks {chosen} only: copg needs adapters on the "
                "same modules of every block (as it refuses layers_to_transform)"
            )
    unselected = sorted(
        {
            site
            for module, site in lay.modules.items()
            if site in sites
            for i in range(cfg.num_layers)
            if not peft_selects(f"{blocks}.{i}.{module}", targets, excluded)
        }
    )
    if unselected:
        raise ValueError(
            f"{file}: holds adapters of {peft_target_modules(cfg.model_type, unselected)}, which its {which} "
            "do not select in every block (PEFT would load the adapter without them): the adapter's config "
            "and weights disagree"
        )


def load_peft_adapter(model: Decoder, folder: str | Path, *, dropout: float = 0.0, mesh: Mesh | None = None):
    """`model` (a base Decoder) with the LoRA adapter of a PEFT folder, each tensor placed in its sharding.

    Its rank, alpha and sites come from the folder: the sites are the modules its tensors adapt, which must
    be the same in every block. `dropout` is the training setting (the file's `lora_dropout` is not used).

    Raises:
      ValueError: an unsupported setting, a tensor of an unexpected name or shape, or adapters on some
        blocks only (all named with the file).
    """
    if model.lora_spec is not None:
        raise ValueError("the model already has LoRA adapters")
    config = read_peft_config(folder)
    file, tensors = _adapter_tensors(folder)
    if config.get("velora_config"):  # VeLoRA's buffer serves its backward pass only: the forward is LoRA's
        tensors = {k: v for k, v in tensors.items() if not k.endswith(".lora_velora_embed")}
    lay, cfg = layout(model.config.model_type), model.config
    blocks, sites = _sites(file, tensors, cfg.model_type)
    _check_targets(file, config, tensors, blocks, sites, cfg)
    spec = LoRASpec(
        config["r"],
        float(config["lora_alpha"]),
        dropout,
        tuple(sites),
        bool(config.get("use_rslora")),
        bool(config.get("use_dora")),
    )
    graphdef, abstract = _abstract_lora(model, spec)
    expected = {
        name
        for layer in range(cfg.num_layers)
        for site in sites
        for name in _tensor_names(lay, site, layer, blocks)[: 3 if spec.dora else 2]
    }
    missing = sorted(expected - set(tensors))
    if missing and all(name.endswith(".lora_magnitude_vector") for name in missing):
        raise ValueError(
            f"{file}: adapter_config.json sets use_dora but the weights hold no DoRA magnitudes, e.g. "
            f"{missing[0]}"
        )
    if missing:
        raise ValueError(
            f"{file}: missing {missing[:4]} (adapters must sit on the same modules of every block)"
        )
    extra = sorted(set(tensors) - expected)
    if extra and all(".lora_" not in name for name in extra):
        raise ValueError(
            f"{file}: holds whole tensors {extra[:4]} beside its LoRA weights: PEFT saves the embeddings and "
            "output head when their size changed (tokens added: save_embedding_layers) or modules_to_save "
            "names them; copg trains LoRA weights alone: merge the adapter into its base (PEFT's "
            "merge_and_unload) and train from that folder"
        )
    if extra:
        raise ValueError(
            f"{file}: tensors {extra[:4]} are not LoRA weights of {sites} in a {cfg.model_type} model"
        )
    shardings = dict(nnx.to_flat_state(param_shardings(abstract, mesh))) if mesh is not None else {}
    values = {}
    for where, var in nnx.to_flat_state(abstract):
        stacked = model.scan_layers
        site = next(s for s in sites if _site_path(s) == tuple(where[1 if stacked else 2 : -1]))
        shape = tuple(var.shape[1:] if stacked else var.shape)
        layers = range(cfg.num_layers) if stacked else [where[1]]
        per_layer = []
        for layer in layers:
            part = where[-1]
            name = _tensor_names(lay, site, layer, blocks)["abm".index(part)]
            weight = np.asarray(tensors[name], np.float32)
            want = {
                "a": (shape[-1], int(np.prod(shape[:-1]))),
                "b": (int(np.prod(shape[1:])), shape[0]),
                "m": (int(np.prod(shape)),),
            }[part]
            if weight.shape != want:
                raise ValueError(f"{file}: {name} has shape {weight.shape}, expected {want} (r={spec.rank})")
            if part == "a":
                per_layer.append(weight.T.reshape(shape))
            elif part == "b":
                per_layer.append(_b_from_hf(weight, shape, site, lay))
            else:  # DoRA's magnitudes per output feature, in B's output order
                per_layer.append(_b_from_hf(weight[:, None], (1, *shape), site, lay)[0])
        value = np.stack(per_layer) if stacked else per_layer[0]
        placed = (
            global_array(value, shardings[where].get_value()) if where in shardings else jnp.asarray(value)
        )
        values[where] = var.replace(placed)
    return nnx.merge(graphdef, nnx.from_flat_state(values), nnx.state(model))

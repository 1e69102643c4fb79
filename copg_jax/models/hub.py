"""Family registry, model construction (random or from an HF folder) directly into shardings, HF export."""

from __future__ import annotations

import difflib
import fnmatch
import functools
import json
import logging
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from copg_jax import paths
from copg_jax.models import exaone, gemma, glm, gpt2, gpt_neox, granite, llama, moe_families, olmo, phi3
from copg_jax.models.config import ModelConfig, family, load_config, read_hf_config, register_family
from copg_jax.models.decoder import Decoder
from copg_jax.models.hf_io import open_checkpoint, put_slice, read_slices, state_index, write_safetensors
from copg_jax.sharding import divisible_spec, logical_to_spec, to_host

log = logging.getLogger(__name__)

for _module in (llama, gemma, olmo, exaone, phi3, granite, glm, gpt2, gpt_neox, moe_families):
    register_family(_module)


BASE_PREFIXES = (
    "model.",
    "transformer.",
    "gpt_neox.",
)  # absent from checkpoints of bare base models (GPT2Model)


# the language model inside a multimodal checkpoint (Gemma3ForConditionalGeneration), as transformers 4 and 5
# write it ("language_model.model.*") and as transformers 5 holds it in memory ("model.language_model.*")
WRAPPED = (
    ("model.", "language_model.model."),
    ("model.", "model.language_model."),
    ("lm_head.", "language_model.lm_head."),
)
VISION_PREFIXES = tuple(
    p + part for p in ("", "model.") for part in ("vision_tower.", "multi_modal_projector.")
)  # the rest of a multimodal checkpoint: not loaded


MULTIMODAL_MODEL_TYPES = ("gemma3",)  # config.json model_types whose folders we load as their language model
# files of a base folder an export of the model fine-tuned from it keeps: sampling defaults (and end tokens),
# a multimodal model's image processing
BASE_FILES = ("generation_config.json", "preprocessor_config.json", "processor_config.json")
# config.json fields of a base that no forward pass reads and copg's model config does not carry: training
# settings transformers reads again (dropout rates, initialisation), kept in an export of a model fine-tuned
# from it (further training with transformers got its class defaults: GPT-2's 0.1 dropouts over a base's 0)
BASE_CONFIG_FIELDS = ("*dropout*", "*_pdrop", "initializer_range", "initializer_factor", "use_cache")


def find_tensor(tensors: dict, name: str):
    """(the checkpoint's name of tensor `name`, its entry or None): the name itself, without the base
    prefix (bare base models), or wrapped as a multimodal checkpoint's language model."""
    candidates = [name]
    if name.startswith(BASE_PREFIXES):
        candidates.append(name.split(".", 1)[1])
    candidates += [new + name[len(old) :] for old, new in WRAPPED if name.startswith(old)]
    for candidate in candidates:
        if candidate in tensors:
            return candidate, tensors[candidate]
    return name, None


def param_shardings(model_or_state: nnx.Module | nnx.State, mesh: Mesh) -> nnx.State:
    """NamedShardings of every parameter from its `logical_axes` metadata, shaped like `nnx.state(model)`.

    Use it for `jax.jit` in/out shardings of the model state (`nnx.split(model)[1]`).
    """
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)

    def one(var: nnx.Variable) -> nnx.Variable:
        spec = logical_to_spec(var.get_metadata().get("logical_axes", (None,) * len(var.shape)))
        return var.replace(NamedSharding(mesh, divisible_spec(spec, tuple(var.shape), mesh)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _abstract(cfg: ModelConfig, **kwargs) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), **kwargs)))


def from_config(
    cfg: ModelConfig,
    *,
    rngs: nnx.Rngs | None = None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    mesh=None,
    remat="none",
    attention="auto",
    scan_layers=False,
    grouped_matmul="auto",
) -> Decoder:
    """A randomly initialised model; with `mesh`, each parameter is created directly in its sharding.

    The same `rngs` give the same weights with or without a mesh, with or without `scan_layers`.
    """
    kwargs = dict(
        dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention, scan_layers=scan_layers,
        grouped_matmul=grouped_matmul,
    )  # fmt: skip
    graphdef, init = _initializer(cfg, tuple(kwargs.items()), mesh)
    return nnx.merge(graphdef, init((rngs or nnx.Rngs(0)).params()))


@functools.lru_cache(maxsize=64)
def _initializer(cfg: ModelConfig, kwargs: tuple, mesh: Mesh | None):
    """(graphdef, jitted key -> parameter state) of `from_config`, compiled once per architecture, settings
    and mesh (a process building several models of one config, as tests and sweeps do, compiles one init)."""
    kwargs = dict(kwargs)
    graphdef, abstract = _abstract(cfg, **kwargs)
    init = jax.jit(
        lambda k: nnx.split(Decoder(cfg, rngs=nnx.Rngs(params=k), **kwargs))[1],
        out_shardings=None if mesh is None else param_shardings(abstract, mesh),
    )
    return graphdef, init


def from_pretrained(
    path: str | Path,
    *,
    dtype=jnp.bfloat16,
    param_dtype=jnp.float32,
    mesh=None,
    remat="none",
    attention="auto",
    scan_layers=False,
    grouped_matmul="auto",
) -> Decoder:
    """Loads config.json and *.safetensors of an HF folder (sharded via model.safetensors.index.json).

    Each device reads only its own slice of each tensor from the memory-mapped files (with `scan_layers`, its
    slice of every layer's tensor, stacked).

    Raises:
      ValueError: unsupported model_type, or a tensor whose shape does not match the config (names both).
      KeyError: a tensor the config requires is missing from the checkpoint.
    """
    path = paths.stage(path)  # memory-mapped: a URL's folder is copied to the local cache once
    cfg = load_config(path)
    kwargs = dict(
        dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention, scan_layers=scan_layers,
        grouped_matmul=grouped_matmul,
    )  # fmt: skip
    graphdef, abstract = _abstract(cfg, **kwargs)
    shardings = dict(nnx.to_flat_state(param_shardings(abstract, mesh))) if mesh is not None else {}
    default = SingleDeviceSharding(jax.devices()[0])
    tensors = open_checkpoint(path)
    flat = dict(nnx.to_flat_state(abstract))
    values, used = {}, set()
    for tmap in family(cfg.model_type).tensor_maps(cfg):
        name, found = find_tensor(tensors, tmap.name)
        if found is None:
            raise KeyError(
                f"tensor {tmap.name} (expected shape {tmap.hf_shape}) is missing from checkpoint {path}"
            )
        array, file = found
        if tuple(array.shape) != tmap.hf_shape:
            raise ValueError(
                f"tensor {name} in {file}: expected shape {tmap.hf_shape}, got {tuple(array.shape)}"
            )
        used.add(name)
        for p, value in zip(tmap.paths, tmap.to_params(array), strict=True):
            put_slice(values, *state_index(p, scan_layers), value)
    vision = [name for name in set(tensors) - used if name.startswith(VISION_PREFIXES)]
    if vision:
        warnings.warn(
            f"{path}: a multimodal checkpoint: its language model is loaded, not the {len(vision)} "
            "tensors of its vision tower and projector",
            stacklevel=2,
        )
    if unused := sorted(set(tensors) - used - set(vision)):
        warnings.warn(
            f"{path}: {len(unused)} checkpoint tensors are not used by {cfg.model_type}: {unused[:8]}",
            stacklevel=2,
        )
    loaded = {}
    for key, value in values.items():

        def read(idx, value=value):  # this device's slice, of stacked layers / experts too
            return read_slices(value, tuple(idx)).astype(param_dtype)

        sharding = shardings[key].get_value() if key in shardings else default
        loaded[key] = flat[key].replace(jax.make_array_from_callback(flat[key].shape, sharding, read))
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def save_pretrained(
    model: Decoder,
    path: str | Path,
    *,
    dtype=None,
    extra_tensors: dict[str, jax.Array] | None = None,
    config_updates: dict | None = None,
    base: str | Path = "",
    write: bool = True,
) -> None:
    """Writes config.json + model.safetensors that transformers' AutoModelForCausalLM loads.

    Tensors are gathered to the host one at a time. `dtype` (e.g. jnp.bfloat16) overrides the parameter dtype.
    `extra_tensors` (HF name -> array, e.g. a reward model's "score.weight") are written after the model's,
    `config_updates` update config.json (e.g. its "architectures").

    `base`: the HF folder the model was loaded from (fine-tuned from), whose BASE_FILES (generation and
    processor settings) are copied. When it is a multimodal checkpoint (Gemma 3 from 4B, loaded as its
    language model), the folder written is one too, which transformers loads as that model: the base's
    config.json, its vision tower and projector tensors copied, and the model's tensors under the base's
    names for its language model.

    `write=False` gathers the tensors and writes nothing: a process of a multi-process run beside process 0,
    which writes (every process must join the gathers; writing the same files, they removed each other's).

    Raises:
      ValueError: the model is not `base`'s (multimodal) language model.
    """
    cfg, path = model.config, Path(path)
    if base and not paths.is_url(base) and Path(base).is_dir() and path.exists() and path.samefile(base):
        raise ValueError(f"{path} is the base model's folder: write the model to another")
    flat = dict(nnx.to_flat_state(nnx.state(model)))

    def value(path):
        key, index = state_index(path, model.scan_layers)
        return flat[key].get_value()[index]

    base_config = read_hf_config(base) if base else {}
    multimodal = base_config.get("model_type") in MULTIMODAL_MODEL_TYPES
    if multimodal and load_config(base) != cfg:
        raise ValueError(f"the model is not the language model of the multimodal checkpoint {base}")
    base_tensors = open_checkpoint(paths.stage(base)) if multimodal else {}  # a URL's folder: staged once
    entries, names = [], set()
    for tmap in family(cfg.model_type).tensor_maps(cfg):
        params = [value(p) for p in tmap.paths]
        out_dtype = np.dtype(dtype or params[0].dtype)
        name = find_tensor(base_tensors, tmap.name)[0] if multimodal else tmap.name  # the base's name for it
        names.add(name)
        entries.append((name, tmap.hf_shape, out_dtype, lambda t=tmap, ps=params: t.to_hf(*map(to_host, ps))))
    for name, array in (extra_tensors or {}).items():
        out_dtype = np.dtype(dtype or array.dtype)
        entries.append((name, tuple(array.shape), out_dtype, lambda a=array: to_host(a)))
    for name, (array, _) in sorted(base_tensors.items()):  # the vision tower and projector, as they are
        if name not in names:
            out_dtype = np.dtype(dtype or array.dtype)
            entries.append((name, tuple(array.shape), out_dtype, lambda a=array: np.asarray(a)))
    if not write:
        write_safetensors(None, entries)
        return

    def prepare() -> None:  # what is written is checked by now: a refused save removes nothing
        path.mkdir(parents=True, exist_ok=True)
        remove_old_weights(path)

    write_safetensors(path / "model.safetensors", entries, prepare)
    hf = base_config if multimodal else {**_training_fields(base_config), **cfg.to_hf()}
    if not cfg.router_aux_loss_coef and "router_aux_loss_coef" in base_config:  # off: the base's, kept
        hf["router_aux_loss_coef"] = base_config["router_aux_loss_coef"]
    written = str(entries[0][2])  # transformers 4 reads torch_dtype, 5 writes dtype
    hf = {
        **hf,
        "torch_dtype": written,
        **({"dtype": written} if "dtype" in hf else {}),
        **(config_updates or {}),
    }
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    for file in BASE_FILES if base else ():  # read where they are (a URL too): no weights are staged for them
        if paths.isfile(paths.join(base, file)):
            (path / file).write_bytes(paths.read_bytes(paths.join(base, file)))


def _training_fields(hf: dict) -> dict:
    """The fields of HF config dict `hf` that BASE_CONFIG_FIELDS names."""
    return {k: v for k, v in hf.items() if any(fnmatch.fnmatch(k, p) for p in BASE_CONFIG_FIELDS)}


# weight files an earlier model left in a folder written again: readers would take them first (an index
# before model.safetensors) or beside the new ones
OLD_WEIGHTS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
)


def remove_old_weights(folder: str | Path) -> list[str]:
    """Removes from `folder` (local, or a URL) the weight files (OLD_WEIGHTS) of a model written there before,
    logging them; their names."""
    return _remove_matching(folder, OLD_WEIGHTS, "weight files", files_only=True)


def _remove_matching(folder: str | Path, patterns: tuple[str, ...], what: str, files_only: bool = False):
    """Removes the entries of `folder` (local, or a URL) whose names match `patterns` (files only, or
    folders too), logging them as an earlier model's `what`; their names."""
    if not paths.isdir(folder):
        return []
    old = sorted(
        name
        for name in paths.listdir(folder)
        if any(fnmatch.fnmatch(name, pattern) for pattern in patterns)
        and (not files_only or paths.isfile(paths.join(folder, name)))
    )
    for name in old:
        paths.remove(paths.join(folder, name))
    if old:
        log.warning("%s: removed the %s of an earlier model: %s", folder, what, old)
    return old


# every file a model folder holds that an export writes or that belongs to a model (weights, configuration,
# tokenizer, a PEFT adapter and its folder): an export into a folder replaces all an earlier model left, or
# they are read with the new weights (its tokenizer, chat template, generation settings); other files (a
# model card, notes) stay
# files of which a tokenizer folder holds at least one (fast, SentencePiece, BPE and tiktoken tokenizers)
TOKENIZER_FILES = (
    "tokenizer*",
    "vocab.*",
    "merges.txt",
    "spiece.model",
    "sentencepiece*.model",
    "*.tiktoken",
)
MODEL_FILES = (
    *OLD_WEIGHTS,
    "config.json",
    "generation_config.json",
    "*processor_config.json",
    *TOKENIZER_FILES,
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.*",
    "adapter_config.json",
    "adapter_model.*",
    "adapter",
)


def is_model_file(name: str) -> bool:
    """Whether file or folder `name` in a model folder belongs to the model (MODEL_FILES)."""
    return any(fnmatch.fnmatch(name, pattern) for pattern in MODEL_FILES)


def remove_model_files(folder: str | Path) -> list[str]:
    """Removes from `folder` (local, or a URL) every file and folder of a model written there before
    (MODEL_FILES), logging them; their names."""
    return _remove_matching(folder, MODEL_FILES, "files")


def misspelt_config_keys(hf: dict) -> list[str]:
    """ "key (did you mean other?)" for each key of an HF config dict that transformers' config class of its
    model_type does not know, close to one it knows that the dict lacks: a misspelt key (num_hidden_layer)
    leaves the family's default in place, silently. [] for a model_type transformers does not know."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(hf.get("model_type"))
    except Exception:  # noqa: BLE001 - a warning's help: no config class, no help
        return []
    aliases = type(config).attribute_map
    known = set(config.to_dict()) | set(aliases) | set(aliases.values())
    absent = sorted(known - set(hf))
    out = []
    for key in hf:
        if key not in known and (close := difflib.get_close_matches(str(key), absent, n=1, cutoff=0.8)):
            out.append(f"{key} (did you mean {close[0]}?)")
    return out


def load_tokenizer(path: str | Path):
    """transformers.AutoTokenizer from a folder (a URL's is staged locally), never touching the network."""
    from transformers import AutoTokenizer

    path = paths.stage(path) if paths.is_url(path) and paths.isdir(path) else path
    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist")
    names = [p.name for p in Path(path).iterdir()]
    if not any(fnmatch.fnmatch(n, p) for n in names for p in TOKENIZER_FILES):  # transformers' words: vague
        raise FileNotFoundError(
            f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the tokenizer beside "
            "the model, or name its folder (model.tokenizer)"
        )
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)

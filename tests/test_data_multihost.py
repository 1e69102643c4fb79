"""Two CPU processes: per-host batches assemble into the global batch; precompute_ref agrees with one process.

The test launches this same file as the worker program under launch/local_multiprocess.sh (2 processes x 2
devices); each worker writes what it computed to OUT/data_<rank>.json. Besides the default mesh, two meshes
whose batch shards do not follow the process order: a tensor axis across the processes (both hold both batch
shards, as with one process per GPU) and a data axis alternating between them (process 0 holds shards 1, 3).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(
    model_type="llama", vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, max_position_embeddings=128,
)  # fmt: skip


def data_cfg(folder: Path, rank: int | str, **kw):
    from copg_jax.data.config import DataConfig

    base = dict(
        path=str(folder / "d.jsonl"), cache_dir=str(folder / f"cache_{rank}"), batch_size=8, pad_multiple=8,
        max_prompt_length=16, max_completion_length=16, seed=1,
    )  # fmt: skip
    return DataConfig(**{**base, **kw})


def slot_sums(tokens, rewards, num_slots):
    """Per slot: sum of target ids and count of target tokens; per prompt: reward sums."""
    import jax.numpy as jnp

    from copg_jax.batch import sequence_sums

    valid = tokens.target_slots >= 0
    values = jnp.where(valid, tokens.targets, 0).astype(jnp.float32)
    return (
        sequence_sums(values, tokens.target_slots, num_slots),
        sequence_sums(valid.astype(jnp.float32), tokens.target_slots, num_slots),
        rewards.sum(axis=1),
    )


def worker(out: Path) -> None:
    from copg_jax.distributed import maybe_initialize_distributed

    info = maybe_initialize_distributed()
    import jax
    from jax.experimental import multihost_utils

    from copg_jax.data.pipeline import DataIterator, to_device
    from copg_jax.data.refcache import precompute_ref
    from copg_jax.data.tokenize import tokenize_dataset
    from copg_jax.models import from_pretrained, load_tokenizer
    from copg_jax.sharding import make_mesh

    mesh = make_mesh()
    p0, p1 = ([d for d in jax.devices() if d.process_index == p] for p in (0, 1))
    other_meshes = {
        "tensor_across": make_mesh(2, 1, 2, devices=[p0[0], p1[0], p0[1], p1[1]]),
        "interleaved": make_mesh(4, 1, 1, devices=[p1[0], p0[0], p1[1], p0[1]]),
    }
    tok = load_tokenizer(out / "ckpt")
    result = {"rank": info.process_index, "count": info.process_count, "batches": []}
    result |= {name: [] for name in other_meshes}
    for layout in ("padded", "packed", "shared_prefix"):
        cfg = data_cfg(out, info.process_index, layout=layout)
        data = tokenize_dataset(cfg, tok)
        for name, m in (("batches", mesh), *other_meshes.items()):
            it = DataIterator(data, cfg, ref=None, mesh=m, split_length=None)
            for _ in range(2 if m is mesh else 1):
                batch = to_device(next(it), m)
                k = batch.rewards.shape[1]
                sums = jax.jit(slot_sums, static_argnums=2)(batch.tokens, batch.rewards, 8 * k)
                result[name].append(
                    [np.asarray(multihost_utils.process_allgather(x, tiled=True)).tolist() for x in sums]
                )
    cfg = data_cfg(out, info.process_index, batch_size=4)
    for name, m in (("ref_logps", mesh), ("ref_logps_tensor_across", other_meshes["tensor_across"])):
        model = from_pretrained(out / "ckpt", mesh=m, dtype=jax.numpy.float32)
        cache = precompute_ref(model, tokenize_dataset(cfg, tok), cfg, str(out / f"{name}.parquet"), mesh=m)
        result[name] = np.nan_to_num(cache.logps, nan=99.0).tolist()
    (out / f"data_{info.process_index}.json").write_text(json.dumps(result))


def test_two_hosts_match_one(tmp_path):
    import jax
    from flax import nnx

    from copg_jax.data.pipeline import DataIterator
    from copg_jax.data.refcache import open_ref_cache, precompute_ref
    from copg_jax.data.testing import kway_rows, make_tiny_tokenizer, write_jsonl
    from copg_jax.data.tokenize import tokenize_dataset
    from copg_jax.models import ModelConfig, from_config, save_pretrained

    tok = make_tiny_tokenizer(str(tmp_path / "ckpt"))
    model = from_config(ModelConfig(**MODEL), rngs=nnx.Rngs(0))
    save_pretrained(model, tmp_path / "ckpt")
    write_jsonl(kway_rows(21, seed=4, k_range=(2, 3)), str(tmp_path / "d.jsonl"))

    # the launcher appends each process's device count to XLA_FLAGS (the last counts); conftest's -O0 stays
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env |= {"COPG_LOCAL_DEVICES": "2", "COPG_TIMEOUT_S": "240", "PYTHONPATH": str(ROOT)}
    env |= {"COPG_LOG_DIR": str(tmp_path / "logs")}
    cmd = [str(ROOT / "launch" / "local_multiprocess.sh"), "2", sys.executable, __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        logs = "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((tmp_path / "logs").glob("*"))
        )
        pytest.fail(f"launcher exited {proc.returncode}: {proc.stderr[-2000:]}\n{logs}")
    results = [json.loads((tmp_path / f"data_{r}.json").read_text()) for r in range(2)]

    expected = []  # one process holding the whole global batch
    for layout in ("padded", "packed", "shared_prefix"):
        cfg = data_cfg(tmp_path, "single", layout=layout)
        it = DataIterator(
            tokenize_dataset(cfg, tok), cfg, ref=None, process_index=0, process_count=1, split_length=None
        )
        for _ in range(2):
            batch = next(it)
            expected.append(
                [
                    np.asarray(x).tolist()
                    for x in jax.jit(slot_sums, static_argnums=2)(
                        batch.tokens, batch.rewards, 8 * batch.rewards.shape[1]
                    )
                ]
            )
    for r in results:
        assert (r["rank"], r["count"]) in ((0, 2), (1, 2))
        once = expected[::2]  # the other meshes take the first of the two batches per layout
        for name, want_all in (("batches", expected), ("tensor_across", once), ("interleaved", once)):
            for got, want in zip(r[name], want_all, strict=True):
                for g, w in zip(got, want, strict=True):
                    np.testing.assert_allclose(g, w, rtol=1e-6, err_msg=name)
    cfg = data_cfg(tmp_path, "single", batch_size=4)
    single = precompute_ref(model, tokenize_dataset(cfg, tok), cfg, str(tmp_path / "single.parquet"))
    for r in results:
        for name in ("ref_logps", "ref_logps_tensor_across"):
            np.testing.assert_allclose(
                r[name], np.nan_to_num(single.logps, nan=99.0), rtol=1e-4, atol=1e-4, err_msg=name
            )
    written = open_ref_cache(str(tmp_path / "ref_logps.parquet"), tokenize_dataset(cfg, tok), reference=model)
    np.testing.assert_allclose(written.logps, single.logps, rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))

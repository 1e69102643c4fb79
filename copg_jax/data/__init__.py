"""Scored-completion data: formats -> validated, tokenised rows -> per-host batches; ref-logprob cache.

    from copg_jax.data.tokenize import tokenize_dataset
    from copg_jax.data.refcache import open_ref_cache
    from copg_jax.data.pipeline import DataIterator, to_device

    data = tokenize_dataset(cfg.data, tokenizer)                      # load, validate, tokenise, report
    ref = open_ref_cache(cfg.data.ref_cache, data, reference=path)    # refused if anything changed
    batches = DataIterator(data, cfg.data, ref=ref, mesh=mesh,        # numpy ScoredBatch per host
                           split_length=model.config.split_length)
    batch = to_device(next(batches), mesh)                            # global arrays, "batch"-sharded

Submodules are imported explicitly (nothing here), so `copg_jax.data.config` stays light for config loading.
"""

"""Our loss names mean what TRL means by them: values, gradients and metrics against TRL 1.16's own loss code.

`DPOTrainer._compute_loss` is called with a stand-in trainer (TRL's default DPOConfig values) and a stand-in
model that returns given per-token log-probs, so TRL's own arithmetic runs on the same numbers as ours.
"""

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from copg_jax import losses
from copg_jax.data.config import DataConfig

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
if trl.__version__ != "1.16.0":  # a private method of the trainer is called: pinned to the version checked
    pytest.skip(f"checked against trl 1.16.0, found {trl.__version__}", allow_module_level=True)
from trl import DPOConfig  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402

PROMPT = 3  # prompt tokens before each completion


def _pairs(seed: int, b: int):
    """Per-token policy log-probs of b (chosen, rejected) pairs of different lengths, summed ref log-probs."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 9, (b, 2))
    tokens = [[rng.normal(-2.0, 1.0, n) for n in row] for row in lengths]
    ref = np.asarray([[t.sum() + rng.normal(0, 2.0) for t in row] for row in tokens])
    return tokens, ref, lengths


def _trl(loss_type: str, beta: float, tokens, ref, lengths, run_dir):
    """(loss, d loss / d summed policy log-probs [b, 2], metrics) from TRL's DPOTrainer._compute_loss."""
    b, width = len(tokens), PROMPT + int(lengths.max()) + 1
    completion_mask = torch.zeros((2 * b, width), dtype=torch.long)
    log_probs = torch.zeros((2 * b, width - 1), dtype=torch.float64)
    for side in range(2):  # TRL's batch is [all chosen, all rejected]
        for i in range(b):
            n = int(lengths[i, side])
            completion_mask[side * b + i, PROMPT : PROMPT + n] = 1
            # the log-prob of token t sits at t - 1 (shifted), zero outside the completion as TRL's head gives
            log_probs[side * b + i, PROMPT - 1 : PROMPT - 1 + n] = torch.from_numpy(tokens[i][side])
    log_probs.requires_grad_(True)
    zeros = torch.zeros((2 * b, width - 1), dtype=torch.float64)
    outputs = types.SimpleNamespace(
        log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
    )

    class Model:
        training = True

        def __call__(self, **kwargs):
            assert kwargs["fused_lm_head"]
            return outputs

    defaults = DPOConfig(output_dir=str(run_dir), bf16=False, use_cpu=True, report_to=[])
    assert defaults.loss_type == ["sigmoid"]  # TRL's DPO default: our dpo
    accelerator = types.SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = types.SimpleNamespace(
        model=Model(), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=defaults.ld_alpha,
        precompute_ref_logps=True, f_divergence_type=defaults.f_divergence_type, loss_types=[loss_type],
        loss_weights=[1.0], beta=beta, use_weighting=defaults.use_weighting,
        _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = {
        "input_ids": torch.ones((2 * b, width), dtype=torch.long),
        "attention_mask": torch.ones((2 * b, width), dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.from_numpy(ref[:, 0]),
        "ref_rejected_logps": torch.from_numpy(ref[:, 1]),
    }
    loss = DPOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)
    loss.backward()
    # d loss / d(summed log-prob) is its derivative by any one completion token's log-prob
    grad = log_probs.grad[:, PROMPT - 1].numpy().reshape(2, b).T
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("rewards/")}
    return float(loss.detach()), grad, metrics


@pytest.mark.parametrize(
    ("name", "length_average", "loss_type"),
    [("ipo", None, "ipo"), ("dpo", None, "sigmoid"), ("dpo", True, "sigmoid_norm")],
)
def test_loss_names_match_trl(name, length_average, loss_type, tmp_path):
    tokens, ref, lengths = _pairs(0, 6)
    beta = 0.3
    want_loss, want_grad, want_metrics = _trl(loss_type, beta, tokens, ref, lengths, tmp_path)
    policy = np.asarray([[t.sum() for t in row] for row in tokens])
    rewards = np.tile(DataConfig().preference_rewards, (len(tokens), 1))  # preference rows, as data makes
    with jax.enable_x64(True):

        def ours(p):
            return losses.get_loss(name)(
                p, jnp.asarray(ref), jnp.asarray(rewards), jnp.ones(p.shape, bool), beta,
                lengths=jnp.asarray(lengths), length_average=length_average,
            )  # fmt: skip

        (loss, metrics), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(policy))
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-10, atol=1e-14)
    names = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    assert set(want_metrics) == names
    for key, value in want_metrics.items():
        rtol = 1e-6 if key == "rewards/accuracies" else 1e-12  # TRL averages the 0/1 flags in float32
        np.testing.assert_allclose(float(metrics[key]), value, rtol=rtol, err_msg=key)
    assert 0 < want_metrics["rewards/accuracies"] < 1  # both outcomes occur: the metric is really compared

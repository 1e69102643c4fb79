"""Random streams of a training run: each use of the run's seeds folds its own constant into its seed's
key, so that seeds of equal value (train.seed, rollout.seed and eval_generation.seed all default to 0) never
share random bits -- a rollout's samples once drew the very keys of LoRA's dropout masks. (Commands with a
seed of their own, `copg generate --seed`, and the experiments' fixed seeds use their keys directly.)"""

LORA_INIT = 1  # train.seed: the LoRA adapters' initial A matrices
LORA_DROPOUT = 2  # train.seed: LoRA dropout masks, folded with the update number
ROLLOUT = 3  # rollout.seed: online samples, folded with the rollout number
EVAL_GENERATION = 4  # eval_generation.seed: the samples evaluation by generation scores

"""Text-conditioned quickstart: a captioned MMDiT base on `shapes`, RL with and without NormGuard.

Run (from the repository root):
  python -m normguard_jax.main --config=configs/quickstart_text.py --workdir=workdir/quickstart_text
Another method: --config=configs/quickstart_text.py:grpo (any name of
normguard_jax.objectives.METHODS). To reuse a finished base:
--config.base_workdir=workdir/pretrain_shapes_mmdit.

The same job as configs/quickstart.py (experiments/quickstart.py), on the text path: the base
is the MMDiT of configs/pretrain_shapes_mmdit.py, conditioned on captions embedded by the
built-in word encoder; RL draws the 96 train captions ("a red circle", "a circle in red",
...) as prompts, K samples each, with the empty prompt as CFG's null conditioning; the
reward is the exact shapes rule (colour and shape right); evaluation asks for every class
with its 2 held-out captions. Sizes as the main table's shapes cells (8 prompts × 8 samples,
10-step ODE rollouts, no CFG in rollouts and evaluation: RL is asked to supply the alignment
CFG would); 24 iterations.
"""

import ml_collections

from configs import evaluate as evaluate_config
from configs import pretrain_shapes_mmdit, quickstart


def get_config(method: str = "nft"):
    c = quickstart.get_config(method)
    c.pretrain = pretrain_shapes_mmdit.get_config()
    c.rl.rewards = ml_collections.ConfigDict({"shapes_rule": 1.0})
    c.evaluate = evaluate_config.get_config("shapes")
    c.evaluate.rewards = ml_collections.ConfigDict({"shapes_rule": 1.0})
    c.evaluate.sample.per_class = 30
    c.evaluate.sample.batch_size = 96
    c.evaluate.sample.guidance_scale = 1.0
    return c

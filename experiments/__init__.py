"""Experiments: one script per claim of experiments/README.md, the sweep runner, the quickstart
job and the table and statistics helpers they share. Results go to experiments/results/.

Not part of the library: no normguard_jax module imports this package (normguard_jax.main only
names experiments.quickstart as the module of the ``quickstart`` job). Run a script from the
repository root as ``python experiments/<name>.py`` or ``python -m experiments.<name>``.

Commands:
  run_all.py        every analysis of experiments/README.md, with the compute it took
  main_table.py     the main table (2 bases × 2 rewards × NFT/AWM/DPO × {λ = 0, 0.1}) and its
                    analyses, from one command
  guard_ablation.py NormGuard where the norm inflates: seeds, λ, form, power, margin
  rl_methods.py     every RL method, with and without NormGuard, from one base model
  norm_analyses.py  norm inflation, inference-time renormalisation, adjoint sensitivity
  validity.py       do the quality metrics rank real above degraded images?
  pretrain_grid.py  every offline dataset × architecture, pretrained
  sweep.py          the sweep runner: ``python -m experiments.sweep --config=configs/sweeps/<x>.py``
  quickstart.py     the ``quickstart`` job (README command 1; normguard_jax.main dispatches to it)

Claims of the main table (read by main_table.py):
  lambda_sweep.py   the λ sweep
  early_stopping.py the early-stopping control
  few_step.py       few-step inference
  sample_grids.py   side-by-side samples of the pairs that changed most

Shared:
  table_sweeps.py   running the table sweeps and their base models; reading finished cells
  tables.py         markdown tables, mean ± standard error, paired differences, matching a run
                    against another run's checkpoints
  validity_checks.py standard errors of the quality metrics and the ladder check (validity.py)
"""

"""Flow-matching sampling for RL.

- ``apexcli.flow.sde``: pure step math (SDE / CPS / ODE steps with log-probs, Gaussian KL);
- ``apexcli.flow.rollout``: SD3 glue (prompt embeddings, CFG velocity, rollouts capturing
  trajectories, the training-side log-prob recompute, VAE decoding).

Import from the submodules (``from apexcli.flow.rollout import rollout``); nothing is
re-exported here, so ``apexcli.flow.rollout`` always names the module, not the function.
"""

"""Runs: the layer above training and federation: ``train`` (one run folder, any mode),
``modes`` (central, local), ``study`` (``privseg run``), ``privacy`` (the study's plan and
spend), ``attack`` (attack and audit runs), ``audit_run`` (the one-run audit), ``pretrain``."""

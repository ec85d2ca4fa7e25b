"""The known-truth suite: SAFLEX against the alternatives a user already has (``python -m benchmarks.suite.run``).

Modules: ``data`` (the only data entry point), ``streams`` (per-sample truth), ``models`` (MLP and the training
loop, SAFLEX through ``SaflexLoss``), ``variants`` (SAFLEX rows, peers, baselines, oracle), ``metrics``,
``report`` (JSON entries, analysis, figure), ``run`` (command line).
"""

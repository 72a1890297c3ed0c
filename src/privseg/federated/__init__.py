"""Federation on Flower: the same site code in one-machine simulation and real deployment.

``client_app`` (site side), ``server_app`` (rounds, checkpoints, resume), ``strategy``
(FedAvg / FedProx / FedAdam with per-site bookkeeping), ``simulation`` (``run_federated``),
``deployment`` (SuperLink / SuperNode processes), ``certs`` (TLS and site keys), ``worker``
(a long-lived site process in deployment), ``messages`` (what travels, by name).
Nothing heavy is imported here: Flower loads the apps in short-lived processes.
"""

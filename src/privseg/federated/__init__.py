"""Federation on Flower: the same site code in one-machine simulation and real deployment.

``client_app`` (the site's ClientApp), ``server_app`` (the ServerApp and the run's final files),
``rounds`` (the server's round loop), ``state`` (its saved state, for resume, and status file),
``strategy`` (FedAvg / FedProx / FedAdam and Flower's robust rules, with per-site
bookkeeping), ``validation`` (what a reply must be before it counts), ``secagg`` (SecAgg+
rounds), ``simulation`` (``run_federated``), ``deployment`` (``serve`` and ``join``),
``processes`` (process groups, ports), ``reaper`` (descendants end with privseg),
``app_files`` (the Flower App and config files), ``certs`` (TLS and site keys), ``worker`` (a
site's long-lived ClientApp process), ``flower_compat`` (every use of Flower internals),
``messages`` (what travels, by name).
Nothing heavy is imported here: Flower loads the apps in short-lived processes.
"""

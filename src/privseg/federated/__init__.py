"""Federation on Flower: the same site code in one-machine simulation and real deployment.

``client_app`` (the site's ClientApp), ``site_settings`` (a site's folders, from its node
config), ``answers`` (what a site answers an evaluation query), ``replay`` (a site's kept
replies), ``server_app`` (the ServerApp and the run's final files), ``rounds`` (the server's
round loop), ``exchange`` (messages over the Grid), ``final_test`` (the kept final answers),
``state`` (the saved state, for resume, and the status file), ``strategy`` and ``strategies``
(the registered strategies and Flower's robust rules, with per-site bookkeeping),
``validation`` (what a reply must be before it counts), ``identity`` (which node is which
site), ``secagg`` (SecAgg+ rounds), ``simulation`` (``run_federated``), ``deployment``
(``serve``), ``site`` (``join``: a hospital's side), ``processes`` (process groups, ports),
``reaper`` (descendants end with privseg), ``app_files`` (the Flower App and config files),
``certs`` (TLS and site keys), ``worker`` (a site's long-lived ClientApp process),
``flower_compat`` (every use of Flower internals), ``messages`` (what travels, by name).
Nothing heavy is imported here: Flower loads the apps in short-lived processes.
"""

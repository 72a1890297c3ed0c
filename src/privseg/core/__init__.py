"""Layer 0: what every other part stands on, importing nothing of privseg above it: errors,
atomic files and output-folder claims, progress and logging, the compute device, the
plug-in registries and fixed choices, the label encoding, the results.json schema and the
run-folder layout."""

"""Study reports: figures (``figures``), tables (``tables``) and report.md / report.html
(``render.write_report``), built from a study's ``results.json`` alone."""

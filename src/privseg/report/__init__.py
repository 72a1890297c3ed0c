"""Study reports, built from a study's ``results.json`` alone: figures (``figures``), tables
(``tables``), the summary paragraph (``summary``), one builder per section (``sections``), the
Markdown / HTML rendering (``blocks``) and ``render.write_report``, which writes them."""

"""Command-line tooling around the library (not part of the library API).

- ``clasp_ext.cli.generate``: ``python -m clasp_ext generate``, a streamed CLaSp generation with
  statistics and an optional comparison with the model's own ``generate``;
- ``clasp_ext.cli.calibrate``: ``python -m clasp_ext calibrate``, the cost table of a setup;
- ``clasp_ext.cli.options``: the options both commands take (model, setup knobs);
- ``clasp_ext.cli.models``: the named real models of the command line and the benchmarks in
  ``bench/``, fetched, converted from GGUF once and cached.

The library (``clasp_ext.ops``, ``clasp_ext.reference``, ``clasp_ext.decoding``) never imports
this package: it runs no ``pip`` and fetches no model; it decodes the model it is given.
"""

"""Conversion of GQA/MHA attention to MLA: method configs (`configs`), the budget -> ranks rule (`dims`),
RoPE strategies (`rope`), the key split and assembly (`keys`), the weighted low-rank math (`linalg`)
and its error metrics (`metrics`), calibration statistics (`statistics`, `calibration`), the
per-layer converters and their registry (`converters`), thin module surgery (`surgery`), the prefix
walk (`prefix`), the split search, rank allocation, sequential conversion, the latent norm, and
`convert` itself (`dispatch`); `streaming` converts checkpoints too big to hold."""

"""Generation: the cohort prior, the visit LogitsProcessors, the visit decoding loop, the
patient-by-patient pipeline and the ``promptehr generate`` command."""

"""Generation: the generation config, the cohort prior, the visit LogitsProcessors, the visit
decoding loop and the patient loop (the self-contained core a checkpoint ships in its
``custom_generate/``, entry :mod:`.generate`), ``generate_patients`` and ``save_custom_generate``
(:mod:`.pipeline`), and the ``promptehr generate`` command."""

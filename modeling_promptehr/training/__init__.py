"""Training: examples and collator, the co-occurrence loss, arguments, the Trainer, its
callbacks, and the ``promptehr train`` command."""
